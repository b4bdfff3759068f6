"""Decoding radiographs: PNG/JPEG/TIFF of any bit depth, DICOM, and the checks that keep a
bad file from stopping a run.

    image = load_image("a.png")                    # 8-bit RGB PIL image
    image = load_image("a.png", bit_depth=12)      # 16-bit PNG holding 12-bit data
    image = load_image("a.dcm")                    # DICOM (needs pydicom)
    problem = check_image("a.png")                 # None, or what is wrong with the file

Bit depth. A 16-bit PNG rarely says how many bits its scanner used: 12-bit data (0..4095) is
stored as 0..65535 words. Scaling each image by its own maximum would make a 12-bit film whose
brightest pixel is 1000 come out 4x brighter than its neighbours from the same scanner, so a
data set is scaled by one depth, the smallest of 8/10/12/14/16 bits that holds the maximum of
its images (`scan_bit_depth`), or by `--bit-depth`. Without a depth (one image on its own, e.g.
a retrieval query) the image's own maximum decides, as before.

DICOM. The stored values go through the modality LUT (rescale slope and intercept), then the
VOI LUT or the first window (centre/width) when the file has one, and are scaled to 0..255 over
the VOI output range; without a window over the image's own range (what most PNG exports do).
MONOCHROME1 (white = low values) is inverted, so bone is always bright.

Pixel limit. Files of more than MAX_IMAGE_PIXELS pixels are refused before decoding (a
"decompression bomb": a few kB on disk, gigabytes in memory). The largest chest radiographs
are about 4300 x 4300 = 18 M pixels.
"""
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

MAX_IMAGE_PIXELS = 100_000_000
BIT_DEPTHS = (8, 10, 12, 14, 16)
DICOM_SUFFIXES = (".dcm", ".dicom")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", *DICOM_SUFFIXES)
WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")  # PIL modes of more than 8 bits


class ImageError(ValueError):
    """A file that cannot be decoded into a radiograph; the message says why."""


def is_dicom(path):
    path = Path(path)
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:  # DICOM files without a suffix: 128-byte preamble, then 'DICM'
        with open(path, "rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


def _pydicom():
    try:
        import pydicom
        import pydicom.pixels  # noqa: F401  (pydicom 3)
        return pydicom
    except ImportError as error:
        raise ImageError("reading DICOM files needs pydicom 3 or newer: pip install pydicom "
                         "(compressed DICOM also needs: pip install pylibjpeg pylibjpeg-libjpeg "
                         "pylibjpeg-openjpeg)") from error


# --------------------------------------------------------------------------------------------
# Scaling to 8 bits
# --------------------------------------------------------------------------------------------
def depth_of(peak):
    """The smallest of BIT_DEPTHS whose full scale holds `peak`."""
    return next((b for b in BIT_DEPTHS if peak <= 2 ** b - 1), BIT_DEPTHS[-1])


def to_8bit(array, bit_depth=None, name="image"):
    """Scale a grayscale array to uint8: by `bit_depth` (a data set's depth) when given, else by
    the smallest standard depth that holds this image's maximum. Float images in [0, 1] are
    scaled by 1. Values above the data set's full scale are clipped, with a warning."""
    is_float = np.issubdtype(array.dtype, np.floating)
    array = array.astype(np.float64)
    if array.min() < 0:
        array = array - array.min()
    peak = array.max()
    if is_float and peak <= 1.0:
        full_scale = 1.0
    elif bit_depth is not None:
        full_scale = 2.0 ** bit_depth - 1
        if peak > full_scale:
            warnings.warn(f"{name} has values up to {peak:g}, above the data set's {bit_depth}-bit "
                          f"range (0..{full_scale:g}); they are clipped. Pass --bit-depth "
                          f"{depth_of(peak)} if the data set holds such images", stacklevel=2)
    else:
        full_scale = 2.0 ** depth_of(peak) - 1 if peak <= 2 ** 16 - 1 else peak
    return np.clip(np.rint(array / full_scale * 255.0), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# Opening and decoding
# --------------------------------------------------------------------------------------------
def open_image(path):
    """PIL image with its header read and its size checked, not yet decoded."""
    path = Path(path)
    if path.stat().st_size == 0:
        raise ImageError("the file is empty (0 bytes)")
    with warnings.catch_warnings():  # our own limit below decides
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(path)
        except Image.DecompressionBombError as error:
            raise ImageError(f"{error}; the limit is {MAX_IMAGE_PIXELS:,} pixels") from error
        except Image.UnidentifiedImageError as error:
            raise ImageError("not an image file Pillow can read (a text or HTML file, an "
                             "unsupported format, or a broken header)") from error
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        image.close()
        raise ImageError(f"{width} x {height} = {width * height:,} pixels is above the limit of "
                         f"{MAX_IMAGE_PIXELS:,} (a decompression bomb, or not a radiograph)")
    return image


def _read_dicom(path):
    """(pixel array after the modality and VOI LUTs, (low, high) to scale over, inverted?)."""
    pydicom = _pydicom()
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    ds = pydicom.dcmread(path)
    if "PixelData" not in ds:
        raise ImageError("a DICOM file without pixel data (a report or a structured document?)")
    rows, cols = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
    if rows * cols > MAX_IMAGE_PIXELS:
        raise ImageError(f"{cols} x {rows} pixels is above the limit of {MAX_IMAGE_PIXELS:,}")
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    try:
        array = ds.pixel_array
    except Exception as error:  # pydicom: missing decoders (compressed syntaxes), bad lengths
        raise ImageError(f"cannot decode the DICOM pixel data ({error})") from error
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        raise ImageError(f"a multi-frame DICOM ({ds.NumberOfFrames} frames); export one frame")
    if not photometric.startswith("MONOCHROME"):
        return array, None, False  # colour (RGB, YBR converted by pydicom): 8-bit as is
    array = apply_modality_lut(array, ds).astype(np.float64)
    if "WindowCenter" in ds or "VOILUTSequence" in ds:
        # the VOI output range: what the LUT gives far below and far above any stored value
        low, high = sorted(apply_voi_lut(np.array([-1e12, 1e12]), ds, index=0).tolist())
        array = apply_voi_lut(array, ds, index=0)
    else:
        low, high = float(array.min()), float(array.max())
    return array, (low, high), photometric == "MONOCHROME1"


def load_dicom(path):
    array, value_range, inverted = _read_dicom(path)
    if value_range is None:
        return Image.fromarray(np.ascontiguousarray(array).astype(np.uint8)).convert("RGB")
    low, high = value_range
    scaled = (array - low) / max(high - low, 1e-12) * 255.0
    gray = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    if inverted:
        gray = 255 - gray
    return Image.fromarray(gray, mode="L").convert("RGB")


def load_image(path, bit_depth=None):
    """Decode a radiograph to an 8-bit RGB PIL image; ImageError (or OSError from Pillow for a
    truncated file) when it cannot. `bit_depth`: the data set's depth for 16-bit files."""
    if is_dicom(path):
        if Path(path).stat().st_size == 0:
            raise ImageError("the file is empty (0 bytes)")
        return load_dicom(path)
    with open_image(path) as image:
        image.load()
        if image.mode in WIDE_MODES:
            return Image.fromarray(to_8bit(np.asarray(image), bit_depth, str(path)), mode="L").convert("RGB")
        if image.mode in ("P", "PA"):
            image = image.convert("RGBA")  # palette: via RGBA, as Pillow asks for palettes with transparency
        return image.convert("RGB")


def inspect_image(path, decode=True, peak=False):
    """(problem, peak): problem is None when the file is fine, else a short description; peak is
    the maximum of a grayscale image of more than 8 bits (None for other images or without
    peak=True). decode=False reads only the header (fast: finds empty files, non-images and
    bombs, not truncation)."""
    try:
        if is_dicom(path):
            if Path(path).stat().st_size == 0:
                raise ImageError("the file is empty (0 bytes)")
            if decode:
                load_dicom(path)
            else:
                _pydicom().dcmread(path, stop_before_pixels=True)
            return None, None
        with open_image(path) as image:
            wide = image.mode in WIDE_MODES
            if decode or (peak and wide):
                image.load()
            return None, (float(np.asarray(image).max()) if peak and wide else None)
    except (OSError, ValueError, SyntaxError, ImageError) as error:  # Pillow's errors for bad files
        return str(error) or type(error).__name__, None
    except Exception as error:  # pydicom raises several types for broken files
        return f"{type(error).__name__}: {error}", None


def check_image(path, decode=True):
    """None when the file decodes (or, with decode=False, its header reads), else the problem."""
    return inspect_image(path, decode)[0]
