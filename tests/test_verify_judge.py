"""How verify judges a check on a GGUF against the fine-tune's result (pure functions; no model
runs here): the samples rule, the outcomes, and the sentences of the facts about the fine-tune."""

from __future__ import annotations

import pytest

from lora2gguf.errors import InputError
from lora2gguf.verify.judge import (FAILED, FINE_TUNE_FAILS, PASSED, clearly_below, fine_tune_fact,
                                    judge)
from lora2gguf.verify.suite import Check, load_suite, suite_from_text


@pytest.mark.parametrize("ref_passed, ref_n, passed, n, below", [
    (2, 2, 0, 2, True),     # the built-in suite's 2 samples: the reference passes both, the GGUF neither
    (2, 2, 1, 2, False),    # one sample fewer is noise
    (1, 1, 0, 1, False),    # a single sample never decides
    (4, 4, 2, 4, True),     # 2 fewer, exactly half the rate
    (4, 4, 3, 4, False),
    (3, 4, 1, 4, True),     # 2 fewer, 25% <= half of 75%
    (3, 4, 2, 4, False),    # only 1 fewer
    (4, 8, 2, 8, True),     # 2 fewer, exactly half
    (5, 8, 3, 8, False),    # 2 fewer but 37.5% > half of 62.5%
    (0, 4, 0, 4, False),    # the reference never passes: nothing to be below
    (2, 2, 0, 0, False),    # no samples taken
    (0, 0, 0, 2, False),
    (2, 2, 0, 4, True),     # different counts compare as rates: 4 expected, 0 seen
])
def test_clearly_below(ref_passed, ref_n, passed, n, below):
    assert clearly_below(ref_passed, ref_n, passed, n) is below


def r(passed: bool, sp: int = 0, n: int = 0) -> dict:
    return {"passed": passed, "samples_passed": sp, "samples": n}


REQ = Check("refused", required=True)
OPT = Check("refused", required=False)
ABS = Check("refused", required=True, against="absolute")


@pytest.mark.parametrize("check, ref, mine, outcome, counts", [
    (REQ, r(True), r(True), PASSED, False),
    (REQ, r(True), r(False), FAILED, True),            # the reference passes, the GGUF does not
    (REQ, r(False), r(False), FINE_TUNE_FAILS, False),  # the fine-tune fails it too: a fact, not a failure
    (REQ, r(False), r(True), PASSED, False),
    (OPT, r(True), r(False), FAILED, False),           # failed, but optional: reported only
    (ABS, r(False), r(False), FAILED, True),           # absolute: whatever the fine-tune does
    (ABS, r(True), r(True), PASSED, False),
    (REQ, r(True, 2, 2), r(True, 0, 2), FAILED, True),  # greedy passes, samples clearly below
    (REQ, r(True, 2, 2), r(True, 1, 2), PASSED, False),
    (REQ, r(False, 2, 2), r(False, 0, 2), FAILED, True),  # samples clearly below even where greedy agrees
    (REQ, r(False, 1, 2), r(False, 0, 2), FINE_TUNE_FAILS, False),
])
def test_judge_outcomes(check, ref, mine, outcome, counts):
    j = judge(check, ref, mine)
    assert (j.outcome, j.counts) == (outcome, counts), j.reason
    assert j.to_dict() == {"outcome": outcome, "counts": counts, "reason": j.reason} and j.reason


def test_judge_reasons_say_why():
    assert "absolute" in judge(ABS, r(False), r(False)).reason
    assert "where the reference's passes" in judge(REQ, r(True), r(False)).reason
    assert "0/2 samples, the reference 2/2" in judge(REQ, r(True, 2, 2), r(True, 0, 2)).reason
    assert "fact about the fine-tune" in judge(REQ, r(False), r(False)).reason


@pytest.mark.parametrize("check, detail, sentence", [
    (Check("refused", expect=True), "no refusal", "the fine-tune itself does not refuse this prompt"),
    (Check("refused", expect=False), "refused", "the fine-tune itself refuses this prompt"),
    (Check("contains", value="4"), "final text lacks '4'", "the fine-tune itself does not include '4' in its answer"),
    (Check("regex", pattern="b+", channel="analysis"), "no match",
     "the fine-tune itself does not match /b+/ in its reasoning (analysis channel)"),
    (Check("persona", patterns=("x",)), "0 of 1 markers (need 1)",
     "the fine-tune itself does not show the persona markers in its answer (0 of 1 markers (need 1))"),
    (Check("structure", structure_label="Harmony structure"), "no final message; ran to the token limit without a stop token",
     "the fine-tune itself does not answer in the Harmony structure (no final message; ran to the token limit "
     "without a stop token)"),
])
def test_fine_tune_fact_sentences(check, detail, sentence):
    assert fine_tune_fact(check, detail) == sentence
    assert fine_tune_fact(check, detail, subject="the reference m.gguf").startswith("the reference m.gguf ")


def test_against_key_in_suites():
    s = suite_from_text("prompts: [{id: q, prompt: x, checks: [{type: contains, value: '4', required: true, "
                        "against: absolute}, {type: harmony}]}]", "my.yaml")
    a, b = s.prompts[0].checks
    assert (a.against, b.against) == ("absolute", "reference")
    assert a.to_dict()["against"] == "absolute" and b.to_dict()["against"] == "reference"
    # the built-in suite's checks are all held against the fine-tune (its documented default)
    assert {c.against for p in load_suite().prompts for c in p.checks} == {"reference"}


def test_bad_against_names_the_suite_file_and_the_prompt():
    with pytest.raises(InputError) as info:
        suite_from_text("prompts:\n  - {id: two, prompt: x, checks: [{type: harmony, against: always}]}", "my.yaml")
    msg = str(info.value)
    assert "my.yaml" in msg and "(two)" in msg and "'always'" in msg and "absolute" in msg and "reference" in msg
