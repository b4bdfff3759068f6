"""The OOD guard of test.py and retrieve.py query: on by default wherever ood.py saved a detector.

    detector, path = ood_guard.choose(args.ood, args.resume, fingerprint, args.ood_detector, log)

`requested` is the --ood / --no-ood flag. True (--ood), or a detector file named with
--ood-detector, requires the detector: a missing, unreadable or stale one is ood_detector.load_for_model's
error. False (--no-ood) turns the guard off. None (neither flag) uses the detector ood.py saved
beside the checkpoint (<checkpoint stem>_ood.pth) when that file is there: a model trained on
phantoms or on another hospital's films votes confidently on anything, and without the guard
nothing says so. Where there is no detector the run goes on as before with one note on how to fit
one; a stale detector (fitted for another model, e.g. a best checkpoint that a later run
replaced) or an unreadable one is a warning, not an error, since the user did not ask for it.
"""
from pathlib import Path

from cxr import ood_detector
from cxr.errors import UserError


def choose(requested, checkpoint, fingerprint, path=None, log=print):
    """(detector or None, its path or None); `fingerprint` is the model's
    (checkpoints.model_fingerprint), `log` prints one line (the main process's, under torchrun)."""
    if requested is False:
        return None, None
    named = path is not None
    path = Path(path or ood_detector.default_detector_path(checkpoint))
    if requested or named:
        return ood_detector.load_for_model(checkpoint, fingerprint, path), path
    if not path.is_file():
        log(f"note: no OOD detector found ({path}), so the queries are not checked for being unlike "
            f"the training data; fit one with python ood.py --resume {checkpoint} (--no-ood silences this)")
        return None, None
    try:
        detector = ood_detector.load_for_model(checkpoint, fingerprint, path)
    except UserError as error:
        log(f"warning: {error}. Going on without the OOD guard (--ood makes this an error, "
            "--no-ood silences it)")
        return None, None
    log(f"OOD guard: {path} (--no-ood turns it off)")
    return detector, path
