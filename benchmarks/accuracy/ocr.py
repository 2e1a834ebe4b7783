"""PP-OCRv4 text recognizer (from rapidocr-onnxruntime) scored on real text lines rendered here.

No OCR dataset ships offline, so short English/number lines are drawn with the DejaVu fonts (Pillow's
default font as fallback), cropped tight like a detector's box, preprocessed exactly as rapidocr does
(sorted by aspect ratio, 6 lines a batch, height 48, (x/255 - 0.5)/0.5, zero padding to the batch's
widest line) and CTC-greedy decoded. Scores: character accuracy (PaddleOCR's 1 - normalized edit
distance) and exact-match rate against the rendered strings.
"""

from __future__ import annotations

import functools
import importlib.metadata
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import ModelProto

from benchmarks.accuracy.common import (
    CACHE,
    UNLABELLED_INPUTS,
    Scores,
    Task,
    cached_npz,
    english_sentences,
    fingerprint,
    run_batches,
)

if TYPE_CHECKING:
    from PIL import ImageFont

DIST = "rapidocr-onnxruntime"
MODEL_FILE = "ch_PP-OCRv4_rec_infer.onnx"
INPUT = "x"
HEIGHT, MIN_WIDTH = 48, 320  # rapidocr's rec_img_shape; a batch is widened to its widest line
FONTS = ("DejaVuSans.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf", "DejaVuSans-Bold.ttf")
SIZES = (28, 32, 36)
BATCH = 6  # rapidocr rec_batch_num
RECOVER_TIME_S = 300.0  # a recovery step at batch 64 takes ~10 s on 2 cores: the rows are time-bounded

LINES: tuple[str, ...] = (
    "Hello World", "Invoice No. 20481", "Total: $1,299.00", "Open 9am - 5pm", "Exit", "Platform 3",
    "Do not enter", "Best before 12/2025", "Call 555-0199", "Room 214", "Net weight 500g", "Made in Italy",
    "Speed limit 50", "Thank you!", "Order #A7731", "Parking level B2", "Fresh bread daily", "Gate 17",
    "Welcome to Oslo", "Batch 4412-C", "No smoking", "Price 3.49", "Flight LH 2035", "Main Street 42",
    "Keep refrigerated", "Version 1.4.4", "Page 12 of 40", "Wet floor", "Table 8", "Pull to open",
    "Monday to Friday", "Seat 23F", "Serial 88F2-31", "Sale 30% off", "Bus stop", "Terminal 2",
    "Discount code SAVE10", "Tea 2.50", "Coffee 3.20", "Apple juice", "Quantity 12", "Tax 19%",
    "Library hours", "Emergency exit", "Ticket 00731", "Blue Line", "North entrance", "Floor 5",
    "Garden Cafe", "Lot 77", "Date 2024-03-15", "Time 14:35", "Hotel Central", "Check-in 3pm",
    "Dinner menu", "Soup of the day", "Pay here", "Cash only", "Free WiFi", "Password: sunrise",
    "Account 4471", "Balance 820.15", "Chapter 7", "The quick brown fox", "Station Road",
    "Museum of Art", "Ground floor", "Lift out of order", "Please wait", "Queue here", "Visitor pass",
    "Staff only", "Delivery 8:00", "Meeting room A", "Printer 3", "Volume 2", "Size M", "Colour blue",
    "Weight 2.4 kg", "Length 120 cm", "Model X200", "Battery 85%", "Lane 4", "Zone C", "Track 9",
    "City Hospital", "Pharmacy", "Post office", "Open 24 hours", "Closed Sunday", "Route 66",
    "Km 14.5", "Apartment 3B", "Code 0451", "Year 1998", "Score 3:1", "Level 10", "Small print",
    "Handle with care", "This side up",
)
# Different lines for the "OBS with calibration data" column: never scored.
CALIBRATION_LINES: tuple[str, ...] = (
    "Good morning", "Receipt 55810", "Amount due 74.90", "Left turn only", "Station 12", "River Park",
    "Customer service", "Window seat", "Item 3 of 9", "Warehouse 6", "Shipping label", "Return by 06/30",
    "Green Street 7", "Fire alarm", "Book club", "Hall B", "Reference 9921", "Milk 1.15",
    "Weekly report", "Arrival 18:40", "Bicycle parking", "Office 402", "Total 48 items", "Lunch special",
    "East wing", "Phone 0800 123", "Order ready", "Unit 14", "Ice cream", "Sunday market",
    "Bridge closed", "Exit 21",
)


@functools.cache
def model_path() -> Path:
    files = importlib.metadata.distribution(DIST).files or []
    found = [f for f in files if f.name == MODEL_FILE]
    if not found:
        raise FileNotFoundError(f"{MODEL_FILE} not in {DIST}: pip install --no-deps {DIST}==1.4.4")
    return Path(str(found[0].locate()))


@functools.cache
def charset() -> tuple[str, ...]:
    """CTC classes as rapidocr builds them: blank, the model's dictionary, then space."""
    meta = {p.key: p.value for p in onnx.load(model_path(), load_external_data=False).metadata_props}
    if "character" in meta:
        chars = meta["character"].splitlines()
    else:  # older packages ship the dictionary as a text file next to the models
        files = importlib.metadata.distribution(DIST).files or []
        keys = [f for f in files if f.name.endswith("keys.txt") or f.name.endswith("dict.txt")]
        chars = Path(str(keys[0].locate())).read_text(encoding="utf-8").splitlines()
    return ("<blank>", *chars, " ")


def _font(index: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    from PIL import ImageFont

    try:
        return ImageFont.truetype(FONTS[index % len(FONTS)], SIZES[index % len(SIZES)])
    except OSError:  # no DejaVu on this machine (apt-get install fonts-dejavu-core)
        return ImageFont.load_default(size=SIZES[index % len(SIZES)])


def render(text: str, index: int) -> np.ndarray:
    """Black text on white, cropped to its box plus a few pixels, as uint8 RGB (H, W, 3)."""
    from PIL import Image, ImageDraw

    font = _font(index)
    left, top, right, bottom = map(int, ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), text, font=font))
    pad = 4 + index % 3
    img = Image.new("RGB", (right - left + 2 * pad, bottom - top + 2 * pad), "white")
    ImageDraw.Draw(img).text((pad - left, pad - top), text, fill="black", font=font)
    return np.asarray(img)


def _width(image: np.ndarray) -> int:
    """rapidocr's resized width: the aspect ratio kept at height 48."""
    return math.ceil(HEIGHT * image.shape[1] / image.shape[0])


def preprocess(images: list[np.ndarray], min_width: int = MIN_WIDTH) -> np.ndarray:
    """rapidocr's resize_norm_img for one batch: (N, 3, 48, W) float32 in [-1, 1], zero-padded on the
    right to W = the widest line of the batch (at least 320)."""
    from PIL import Image

    width = max(min_width, *map(_width, images))
    out = np.zeros((len(images), 3, HEIGHT, width), dtype=np.float32)
    for row, image in zip(out, images, strict=True):
        w = _width(image)
        resized = np.asarray(Image.fromarray(image).resize((w, HEIGHT), Image.Resampling.BILINEAR))
        row[:, :, :w] = (resized.transpose(2, 0, 1).astype(np.float32) / 255.0 - 0.5) / 0.5
    return out


@functools.cache
def test_batches() -> tuple[tuple[int, ...], tuple[np.ndarray, ...]]:
    """rapidocr's batching: lines sorted by aspect ratio, 6 a batch, each padded to its widest line.
    Returns the line order and the batches."""
    images = [render(text, i) for i, text in enumerate(LINES)]
    order = tuple(int(i) for i in np.argsort([im.shape[1] / im.shape[0] for im in images], kind="stable"))
    batches = tuple(preprocess([images[i] for i in order[b:b + BATCH]]) for b in range(0, len(order), BATCH))
    return order, batches


def ctc_decode(probs: np.ndarray) -> list[str]:
    """Greedy CTC: best class per step, merge repeats, drop blanks."""
    chars = charset()
    texts = []
    for row in probs.argmax(axis=2):
        keep = np.ones(len(row), dtype=bool)
        keep[1:] = row[1:] != row[:-1]
        texts.append("".join(chars[i] for i in row[keep & (row != 0)]))
    return texts


def edit_distance(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def recognize(model: ModelProto | Path) -> list[str]:
    """The recognized text of every line of LINES, in LINES order."""
    order, batches = test_batches()
    texts = [t for probs in run_batches(model, ({INPUT: b} for b in batches)) for t in ctc_decode(probs)]
    out = [""] * len(LINES)
    for i, text in zip(order, texts, strict=True):
        out[i] = text
    return out


def score(model: ModelProto | Path) -> Scores:
    """char_acc is PaddleOCR's norm_edit_dis: 1 - mean(edit distance / max(len(pred), len(truth)))."""
    pairs = list(zip(recognize(model), LINES, strict=True))
    ned = [edit_distance(t, gt) / max(len(t), len(gt), 1) for t, gt in pairs]
    return {"char_acc": 1.0 - float(np.mean(ned)), "exact": float(np.mean([t == gt for t, gt in pairs]))}


def calibration_path() -> Path:
    """Other lines than the scored ones, in one array: padded to the widest of them."""
    path = CACHE / f"ocr-calibration-{fingerprint(CALIBRATION_LINES, FONTS, SIZES, HEIGHT, MIN_WIDTH)}.npz"
    return cached_npz(path, lambda: {INPUT: preprocess([render(t, i) for i, t in enumerate(CALIBRATION_LINES)])})


def unlabelled_path() -> Path:
    """UNLABELLED_INPUTS short lines (two to four words of English sentences that ship with Python, none
    of them scored), rendered and preprocessed like the calibration lines."""
    sentences = english_sentences(UNLABELLED_INPUTS)
    lines = [" ".join(s.split()[: 2 + i % 3]) for i, s in enumerate(sentences)]
    path = CACHE / f"ocr-unlabelled-{fingerprint(lines, FONTS, SIZES, HEIGHT, MIN_WIDTH)}.npz"
    return cached_npz(path, lambda: {INPUT: preprocess([render(t, i) for i, t in enumerate(lines)])})


def task() -> Task:
    return Task(
        name="pp-ocrv4-rec",
        onnx_path=model_path(),
        score=score,
        calibration=calibration_path(),
        prune_options={"input_shapes": {INPUT: [1, 3, HEIGHT, MIN_WIDTH]}},
        note="ONNX-only (Paddle export): no torch net for Torch-Pruning",
        unlabelled=unlabelled_path(),
        recover_options={"recover_time": RECOVER_TIME_S},
    )
