"""Ontology-driven reasoning over region statistics: which radiological signs the saliency map
and the masks show, whether they support or contradict the retrieved finding, in plain words.

    ontology = load_ontology("ontology.json")        # validated; errors name the entry
    result = reason(ontology, stats, predicted="effusion")
    result["rules_fired"], result["contradicting"], result["sentences"]

The rules, their thresholds and their sentences live in the JSON file (see its "description");
this module only evaluates them. Each rule is a conjunction of conditions `stat op value` over
the statistics of regions.region_statistics (and the derived ones it adds).
"""
import json
import operator
import string
from pathlib import Path

import numpy as np

from cxr import regions

DEFAULT_ONTOLOGY = Path(__file__).with_name("ontology.json")
OPS = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le,
       "==": operator.eq, "!=": operator.ne}
RULE_KEYS = {"id", "sign", "when", "supports", "contradicts", "sentence", "caution"}
# What rules may test: the statistics regions.region_statistics returns (computed on a blank
# map, so the list cannot drift from the code).
STATISTICS = set(regions.region_statistics(np.zeros((2, 2)))) - {"peak_xy", "zones"}
TEXT_STATISTICS = {"top_zone", "peak_zone", "peak_level"}


class OntologyError(ValueError):
    """A malformed ontology file; the message names the file and the entry."""


def load_ontology(path=DEFAULT_ONTOLOGY):
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as error:
        raise OntologyError(f"{path}: cannot be read ({error})") from error
    except json.JSONDecodeError as error:
        raise OntologyError(f"{path}: not valid JSON at line {error.lineno}: {error.msg}") from error
    validate(data, path)
    return data


def validate(data, path="ontology"):
    def fail(where, message):
        raise OntologyError(f"{path}: {where}: {message}")

    if not isinstance(data, dict):
        fail("top level", "must be an object with findings, regions, signs and rules")
    for key in ("findings", "signs", "rules"):
        if key not in data:
            fail("top level", f"missing '{key}'")
    findings, signs = data["findings"], data["signs"]
    if not isinstance(findings, dict) or not findings:
        fail("findings", "must be a non-empty object {name: {description}}")
    alias_of = {}
    for name, entry in findings.items():
        aliases = entry.get("aliases", []) if isinstance(entry, dict) else None
        if not isinstance(aliases, list) or not all(isinstance(a, str) and a for a in aliases):
            fail(f"findings '{name}'", "'aliases' must be a list of names (the public data sets' spellings)")
        for alias in [name, *aliases]:
            if alias.casefold() in alias_of and alias_of[alias.casefold()] != name:
                fail(f"findings '{name}'", f"the name {alias!r} is also finding '{alias_of[alias.casefold()]}''s")
            alias_of[alias.casefold()] = name
    if not isinstance(signs, dict):
        fail("signs", "must be an object {id: name}")
    if not isinstance(data["rules"], list):
        fail("rules", "must be a list")
    seen = set()
    for i, rule in enumerate(data["rules"]):
        where = f"rules[{i}]" + (f" (id '{rule.get('id')}')" if isinstance(rule, dict) else "")
        if not isinstance(rule, dict):
            fail(where, "must be an object")
        unknown = set(rule) - RULE_KEYS
        if unknown:
            fail(where, f"unknown key(s) {sorted(unknown)}; allowed: {sorted(RULE_KEYS)}")
        if not isinstance(rule.get("id"), str) or not rule["id"]:
            fail(where, "needs a non-empty string 'id'")
        if rule["id"] in seen:
            fail(where, "duplicate id")
        seen.add(rule["id"])
        if rule.get("sign") not in signs:
            fail(where, f"sign {rule.get('sign')!r} is not one of the signs {sorted(signs)}")
        conditions = rule.get("when")
        if not isinstance(conditions, list) or not conditions:
            fail(where, "'when' must be a non-empty list of {stat, op, value}")
        for j, condition in enumerate(conditions):
            if not isinstance(condition, dict) or set(condition) != {"stat", "op", "value"}:
                fail(f"{where} when[{j}]", "must be exactly {\"stat\", \"op\", \"value\"}")
            if condition["op"] not in OPS:
                fail(f"{where} when[{j}]", f"unknown op {condition['op']!r}; use one of {' '.join(OPS)}")
            if condition["stat"] not in STATISTICS:
                fail(f"{where} when[{j}]", f"unknown stat {condition['stat']!r}; the statistics are "
                     f"{', '.join(sorted(STATISTICS))}")
            wanted = str if condition["stat"] in TEXT_STATISTICS else (int, float)
            if not isinstance(condition["value"], wanted) or isinstance(condition["value"], bool):
                fail(f"{where} when[{j}]", f"value {condition['value']!r} of {condition['stat']} must be "
                     f"{'a string' if wanted is str else 'a number'}")
        for key in ("supports", "contradicts"):
            names = rule.get(key, [])
            if not isinstance(names, list) or any(name not in findings for name in names):
                fail(where, f"'{key}' must list findings among {sorted(findings)}, got {names!r}")
        if not isinstance(rule.get("sentence"), str):
            fail(where, "needs a 'sentence' (placeholders: {stat} or {stat:.2f})")
        for _, field, _, _ in string.Formatter().parse(rule["sentence"]):
            stats = {c["stat"] for c in conditions}
            if field is not None and field not in stats | {f"{s}_limit" for s in stats} | {"top_zone"}:
                fail(where, f"sentence uses {{{field}}}; it may use its conditions' stats, "
                     "<stat>_limit (the condition's value) and top_zone")


def _holds(condition, stats):
    value = stats.get(condition["stat"])
    if value is None:
        return None  # absent statistic (no mask): neither fires nor contradicts
    try:
        return bool(OPS[condition["op"]](value, condition["value"]))
    except TypeError:
        return False


def ontology_findings(ontology, label):
    """The ontology's findings a retrieved label names: its own names or their aliases ("Pleural
    Effusion" is effusion), each finding of a combination ("Cardiomegaly|Effusion"); a name the
    ontology does not know is left out."""
    names = {}
    for name, entry in ontology["findings"].items():
        for alias in [name, *entry.get("aliases", [])]:
            names[alias.casefold()] = name
    return {names[part.strip().casefold()] for part in (label or "").split("|") if part.strip().casefold() in names}


def reason(ontology, stats, predicted=None):
    """The rules that fire on `stats`, which support or contradict `predicted` (a finding, an
    alias or a combination of them joined by '|': a rule supports it when it supports any of its
    findings), and sentences."""
    predicted_findings = ontology_findings(ontology, predicted)
    fired, supporting, contradicting, cautions, sentences = [], [], [], [], []
    not_evaluated = {}  # rule id -> the statistics it needs that this image lacks (no mask)
    for rule in ontology["rules"]:
        results = [_holds(condition, stats) for condition in rule["when"]]
        if False in results:  # cannot fire, whatever the missing statistics would say
            continue
        if None in results:
            not_evaluated[rule["id"]] = sorted({c["stat"] for c, r in zip(rule["when"], results) if r is None})
            continue
        values = {c["stat"]: stats[c["stat"]] for c in rule["when"]}
        limits = {f"{c['stat']}_limit": c["value"] for c in rule["when"]}
        record = {"id": rule["id"], "sign": ontology["signs"][rule["sign"]], "values": values,
                  "supports": rule.get("supports", []), "contradicts": rule.get("contradicts", [])}
        fired.append(record)
        sentence = rule["sentence"].format(**values, **limits, top_zone=stats.get("top_zone"))
        if predicted_findings & set(record["supports"]):
            supporting.append(rule["id"])
        if predicted_findings & set(record["contradicts"]):
            contradicting.append(rule["id"])
            sentence += f" This speaks against {predicted}."
        if rule.get("caution"):
            cautions.append(rule["id"])
        sentences.append(sentence)
    if predicted is not None:
        summary = f"Retrieved finding: {predicted}"
        if supporting:
            names = ", ".join(ontology["signs"][r["sign"]] for r in ontology["rules"] if r["id"] in supporting)
            summary += f", supported by: {names}."
        elif not_evaluated:
            summary += (f"; no sign supports it among the rules that could run ({len(not_evaluated)} of "
                        f"{len(ontology['rules'])} rules could not run: without lung and heart masks "
                        f"there is no {', '.join(sorted({s for need in not_evaluated.values() for s in need}))}).")
        else:
            summary += "; no sign in the ontology supports it on this image."
        sentences.insert(0, summary)
    return {"predicted": predicted, "rules_fired": [r["id"] for r in fired], "fired": fired,
            "supporting": supporting, "contradicting": contradicting, "cautions": cautions,
            "not_evaluated": not_evaluated, "sentences": sentences}
