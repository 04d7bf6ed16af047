"""How a check's result on a GGUF is judged against the fine-tune's (pure functions).

verify tests the conversion, not the fine-tune. Each check says what it is held against
(``against:`` in the suite):

- ``reference`` (the default): a GGUF fails the check only where the reference (the fine-tune
  through transformers + PEFT, or the unquantized GGUF when the fine-tune cannot run) passes it
  and the GGUF does not: greedily, or with a sample pass rate :func:`clearly_below` the
  reference's. A check the reference fails too is a *fact about the fine-tune*
  (:data:`FINE_TUNE_FAILS`): reported, never counted against a file.
- ``absolute``: the GGUF's greedy answer must pass whatever the fine-tune does (and its samples
  must not be clearly below the reference's either).

Only a *required* check that a file :data:`FAILED` fails the run.

With the unquantized GGUF as the reference (the fine-tune does not fit in memory), that file is
judged against itself, as it is for the numeric gate ("this file is the reference"): the checks it
fails are listed, as what the reference fails, and not counted; verify then has no evidence about
the fine-tune either way, and says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from .suite import STRUCTURE_CHECK, Check

#: outcomes of a check on one GGUF
PASSED = "passed"
FAILED = "failed"  # counts against the GGUF (when the check is required)
FINE_TUNE_FAILS = "fine_tune_fails"  # the reference fails it too: a fact about the fine-tune
#: outcome recorded for the reference's own column
REFERENCE = "reference"

#: samples: "clearly below" needs at least this many fewer passing samples than the reference ...
MIN_SAMPLE_DEFICIT = 2
#: ... and at most this fraction of the reference's pass rate
MAX_SAMPLE_RATE_RATIO = Fraction(1, 2)


def clearly_below(ref_passed: int, ref_samples: int, passed: int, samples: int) -> bool:
    """True when a GGUF's sample pass rate is clearly below the reference's: it passes at least
    :data:`MIN_SAMPLE_DEFICIT` (2) fewer samples than the reference would on as many samples, and
    at most half the reference's rate. With 2 samples that is "the reference passes both, the GGUF
    neither"; one sample never decides (a single seeded sample is noise, and seeds do not give the
    same draws in transformers and llama.cpp). Exact arithmetic (fractions)."""
    if ref_samples <= 0 or samples <= 0:
        return False
    ref_rate = Fraction(ref_passed, ref_samples)
    rate = Fraction(passed, samples)
    return ref_rate * samples - passed >= MIN_SAMPLE_DEFICIT and rate <= ref_rate * MAX_SAMPLE_RATE_RATIO


@dataclass(frozen=True)
class Judgement:
    outcome: str  # PASSED, FAILED or FINE_TUNE_FAILS
    counts: bool  # a required check FAILED: it fails the run
    reason: str  # why, in words

    def to_dict(self) -> dict[str, Any]:
        return {"outcome": self.outcome, "counts": self.counts, "reason": self.reason}


def judge(check: Check, ref: dict[str, Any], mine: dict[str, Any]) -> Judgement:
    """Judge one check on one GGUF. ``ref`` and ``mine`` are results as verify records them:
    ``{"passed": greedy passed, "samples_passed": int, "samples": int}``."""
    samples_low = clearly_below(int(ref.get("samples_passed", 0)), int(ref.get("samples", 0)),
                                int(mine.get("samples_passed", 0)), int(mine.get("samples", 0)))
    samples_text = (f"passes {mine.get('samples_passed')}/{mine.get('samples')} samples, the reference "
                    f"{ref.get('samples_passed')}/{ref.get('samples')}")
    if not mine["passed"] and check.against == "absolute":
        outcome, reason = FAILED, "the greedy answer fails an absolute check, required whatever the fine-tune does"
    elif not mine["passed"] and ref["passed"]:
        outcome, reason = FAILED, "the greedy answer fails it where the reference's passes"
    elif samples_low:
        outcome, reason = FAILED, samples_text + " (clearly below)"
    elif not mine["passed"]:
        outcome, reason = FINE_TUNE_FAILS, "the reference fails it too: a fact about the fine-tune, not the conversion"
    elif not ref["passed"]:
        outcome, reason = PASSED, "passes (the reference does not)"
    else:
        outcome, reason = PASSED, "passes, as the reference does"
    return Judgement(outcome, check.required and outcome == FAILED, reason)


def fine_tune_fact(check: Check, detail: str, *, subject: str = "the fine-tune itself") -> str:
    """What a check the reference fails says about the fine-tune, in one sentence
    ("the fine-tune itself does not refuse this prompt")."""
    where = {"final": "answer", "analysis": "reasoning (analysis channel)", "all": "completion"}[check.channel] \
        if check.type != STRUCTURE_CHECK else ""
    if check.type == "contains":
        return f"{subject} does not include {check.value!r} in its {where}"
    if check.type == "regex":
        return f"{subject} does not match /{check.pattern}/ in its {where}"
    if check.type == "persona":
        return f"{subject} does not show the persona markers in its {where} ({detail})"
    if check.type == "refused":
        return f"{subject} does not refuse this prompt" if check.expect else f"{subject} refuses this prompt"
    return f"{subject} does not answer in the {check.label} ({detail})"
