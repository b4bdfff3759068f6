"""The contact sheet of one retrieval query (retrieve.py query): the query, then its neighbours.

    contact_sheet.draw(query_path, record, "0000_query.png", maps=None, bit_depth=None)

`record` is one query of retrieve.py's results.json. Each tile is captioned; captions wrap over
as many lines as they need, so a file name is never cut (the name is how a user finds the film
again). A query from a labelled list ("label", "correct" in the record) shows its label, its tile
is framed green when the vote equals the label, red when not, and each neighbour is captioned
right (green) or WRONG (red) by that label (right: the same label, or for finding combinations
such as "Cardiomegaly|Effusion" a finding in common). An unlabelled query's neighbours have nothing to be
right about: those that differ from the vote are captioned in grey.
"""
import re
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from cxr import explain_figures
from cxr.images import load_image
from cxr.public_lists import shares_a_finding

LINE_H = 16  # pixels per caption line at the 14-pixel font
FRAME = 3  # width of the right/wrong frame of a labelled query's tile
# A caption line breaks after these where it can: file names have no spaces but many of these.
BREAK_AFTER = r"_\-./ "


def font(size=14):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the small bitmap font
        return ImageFont.load_default()


def wrap(text, font, width):
    """Lines of `text`, each at most `width` pixels wide in `font`: broken after `_ - . /` or a
    space where the parts fit, between characters where one part alone is too wide. No character
    is dropped or added: "".join(lines) == text."""
    parts = re.findall(f"[^{BREAK_AFTER}]*[{BREAK_AFTER}]|[^{BREAK_AFTER}]+", text)
    lines, line = [], ""
    for part in parts:
        if font.getlength(line + part) <= width:
            line += part
            continue
        if line:
            lines.append(line)
            line = ""
        for char in part:  # the part on a line of its own, split where even that is too wide
            if line and font.getlength(line + char) > width:
                lines.append(line)
                line = ""
            line += char
    if line or not lines:
        lines.append(line)
    return lines


def captions(query_path, record):
    """[(path, [caption texts], colour)] of the tiles, the query first."""
    flag = " (OOD!)" if record.get("ood", {}).get("flagged") else ""
    texts = [f"QUERY {Path(query_path).name}"]
    colour = "black"
    if "label" in record:
        texts.append(f"label: {record['label']}")
        texts.append(f"vote: {record['vote']} {'right' if record['correct'] else 'WRONG'}{flag}")
        colour = "darkgreen" if record["correct"] else "red"
    else:
        texts.append(f"vote: {record['vote']}{flag}")
    tiles = [(query_path, texts, colour)]
    for rank, n in enumerate(record["neighbours"], start=1):
        if "label" in record:  # right or wrong by the query's own label, not by the vote
            right = shares_a_finding(n["label"], record["label"])
            tiles.append((n["path"], [f"#{rank} {n['label']} {'right' if right else 'WRONG'}",
                                      f"sim {n['similarity']:.3f}"], "darkgreen" if right else "red"))
        else:  # an unlabelled query: nothing to be right about; grey where it differs from the vote
            tiles.append((n["path"], [f"#{rank} {n['label']}", f"sim {n['similarity']:.3f}"],
                          "black" if n["label"] == record["vote"] else "dimgray"))
    return tiles


def draw(query_path, record, out_path, tile=160, columns=5, maps=None, bit_depth=None):
    """Write the sheet to out_path; with `maps` (one saliency map per tile, query first) each
    thumbnail carries its heat map."""
    face = font(14)
    tiles = [(path, [line for text in texts for line in wrap(text, face, tile - 12)], colour)
             for path, texts, colour in captions(query_path, record)]
    caption_h = 4 + LINE_H * max(len(lines) for _, lines, _ in tiles)  # one height: rows align
    rows = 1 + (len(tiles) - 1 + columns - 1) // columns
    sheet = Image.new("RGB", (columns * tile, rows * (tile + caption_h)), "white")
    pen = ImageDraw.Draw(sheet)
    for position, (path, lines, colour) in enumerate(tiles):
        row, col = (0, 0) if position == 0 else (1 + (position - 1) // columns, (position - 1) % columns)
        x, y = col * tile, row * (tile + caption_h)
        try:
            thumb = load_image(path, bit_depth)
            if maps is not None:
                thumb = Image.fromarray(explain_figures.overlay(thumb, maps[position]))
            thumb = thumb.resize((tile - 8, tile - 8), Image.Resampling.BILINEAR)
            sheet.paste(thumb, (x + 4, y + 4))
        except (OSError, ValueError):
            print(f"warning: {path}: cannot be read for the contact sheet (moved or deleted "
                  "since indexing?)", file=sys.stderr)
            pen.text((x + 8, y + tile // 2), "image missing", fill="red", font=face)
        if position == 0 and "correct" in record:  # in the 4-pixel margin around the thumbnail
            pen.rectangle((x, y, x + tile - 1, y + tile - 1), outline=colour, width=FRAME)
        for i, line in enumerate(lines):
            pen.text((x + 6, y + tile + 2 + LINE_H * i), line, fill=colour, font=face)
    sheet.save(out_path)
    return out_path
