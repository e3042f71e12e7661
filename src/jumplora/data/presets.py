"""Benchmark task presets and task orders (O-LoRA / JumpLoRA 15-task CL benchmark).

Kept as plain data so the CLI, the configs and the tests all agree on one source of truth.
"""

from __future__ import annotations

from dataclasses import dataclass

_TOPIC = "What is the topic of the content? Choose one from the options."
_REVIEW = "What is the sentiment of the review? Choose one from the options."
_PARAGRAPH = "What is the sentiment of the following paragraph? Choose one from the options."
_NLI = (
    "What is the logical relationship between the 'sentence 1' and the 'sentence 2'? "
    "Choose one from the options."
)


@dataclass(frozen=True)
class TaskPreset:
    """Where a benchmark task lives (relative to the data dir) and the instruction its prompt uses."""

    name: str
    folder: str
    instruction: str
    # Labels that mark "no gold label" in the source data; such items are dropped (and counted) at load.
    drop_labels: tuple[str, ...] = ()


BENCHMARK_TASKS: dict[str, TaskPreset] = {
    p.name: p
    for p in (
        TaskPreset("dbpedia", "TC/dbpedia", _TOPIC),
        TaskPreset("amazon", "SC/amazon", _REVIEW),
        TaskPreset("yahoo", "TC/yahoo", _TOPIC),
        TaskPreset("agnews", "TC/agnews", _TOPIC),
        TaskPreset("yelp", "SC/yelp", _REVIEW),
        # MNLI's test split has 131 items labelled "-" (annotators reached no consensus). They cannot
        # be answered with any option, so, as GLUE does, they are dropped rather than rejected.
        TaskPreset("mnli", "NLI/MNLI", _NLI, drop_labels=("-",)),
        TaskPreset("cb", "NLI/CB", _NLI),
        TaskPreset("rte", "NLI/RTE", _NLI),
        TaskPreset(
            "qqp",
            "QQP/QQP",
            "Whether the 'first sentence' and the 'second sentence' have the same meaning? "
            "Choose one from the options.",
        ),
        TaskPreset(
            "boolq",
            "BoolQA/BoolQA",
            "According to the following passage, is the question true or false? Choose one from the options.",
        ),
        TaskPreset(
            # The COPA text already carries the cause/effect question, so the instruction stays generic.
            "copa",
            "COPA/COPA",
            "Which sentence is the cause or the effect asked about in the question? "
            "Choose one from the options.",
        ),
        TaskPreset(
            "wic",
            "WiC/WiC",
            "Given a word and two sentences, whether the word is used with the same sense in both "
            "sentences? Choose one from the options.",
        ),
        TaskPreset(
            "multirc",
            "MultiRC/MultiRC",
            "According to the following passage and question, is the candidate answer true or false? "
            "Choose one from the options.",
        ),
        TaskPreset("imdb", "SC/IMDB", _PARAGRAPH),
        TaskPreset("sst2", "SC/SST-2", _PARAGRAPH),
    )
}

# Exactly as listed in the benchmark README (facts from the O-LoRA / JumpLoRA papers).
ORDERS: dict[int, list[str]] = {
    1: ["dbpedia", "amazon", "yahoo", "agnews"],
    2: ["dbpedia", "amazon", "agnews", "yahoo"],
    3: ["yahoo", "amazon", "agnews", "dbpedia"],
    4: [
        "mnli", "cb", "wic", "copa", "qqp", "boolq", "rte", "imdb",
        "yelp", "amazon", "sst2", "dbpedia", "agnews", "multirc", "yahoo",
    ],
    5: [
        "multirc", "boolq", "wic", "mnli", "cb", "copa", "qqp", "rte",
        "imdb", "sst2", "dbpedia", "agnews", "yelp", "amazon", "yahoo",
    ],
    6: [
        "yelp", "amazon", "mnli", "cb", "copa", "qqp", "rte", "imdb",
        "sst2", "dbpedia", "agnews", "yahoo", "multirc", "boolq", "wic",
    ],
}  # fmt: skip
STANDARD_ORDERS: tuple[int, ...] = (1, 2, 3)
LONG_ORDERS: tuple[int, ...] = (4, 5, 6)
