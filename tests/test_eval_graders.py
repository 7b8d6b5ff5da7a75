"""Table of tricky completions for every grader; references in the datasets' own forms."""

import pytest

from quantlrm.errors import QuantLRMError
from quantlrm.eval import answer_text, extract, grade
from quantlrm.eval.graders import normalize_reference

B = "\\boxed"

AIME = [
    # (completion, reference, expected)
    (f"{B}{{42}}", "42", True),
    (f"so {B}{{ 042 }}", "42", True),
    (f"{B}{{042}}", 42, True),
    (f"{B}{{42}}", "042", True),
    (f"{B}{{0}}", "000", True),
    (f"{B}{{1{{,}}000}}", "1000", True),
    (f"{B}{{1,000}}", "1000", True),
    (f"{B}{{1,2}}", "12", False),  # a list, not a thousands separator
    (f"{B}{{\\frac{{1}}{{2}}}}", "1", False),
    (f"{B}{{\\dfrac{{84}}{{2}}}}", "42", False),
    (f"{B}{{\\text{{ 17 }}}}", "17", True),
    (f"{B}{{\\textbf{{042}}}}", "42", True),
    (f"first {B}{{12}}, on reflection {B}{{13}}", "13", True),
    (f"first {B}{{12}}, on reflection {B}{{13}}", "12", False),
    (f"<think>so {B}{{5}}</think>The answer is {B}{{7}}", "7", True),
    (f"<think>so {B}{{5}}</think>The answer is {B}{{7}}", "5", False),
    (
        f"<think>the answer is {B}{{5}}</think> So the answer is 5.",
        "5",
        False,
    ),  # nothing boxed after </think>
    (f"<think>long reasoning cut off at {B}{{5}}", "5", True),  # no </think>: whole text
    (f"<think>a</think><think>b {B}{{3}}</think> {B}{{4}}", "4", True),
    (f"${B}{{42}}$", "42", True),
    (f"\\[\n{B}{{204}}\n\\]", "204", True),
    (f"**Final Answer**\n\\[\n{B}{{204}}\n\\]", "204", True),
    (f"{B}{{42.}}", "42", True),
    (f"{B}{{42.0}}", "42", True),
    (f"{B}{{42.5}}", "42", False),
    (f"{B}{{x = 42}}", "42", True),
    (f"{B}{{n=315}}", "315", True),
    (f"{B}{{42^\\circ}}", "42", True),
    (f"{B}{{42^{{\\circ}}}}", "42", True),
    (f"{B}{{\\$42}}", "42", True),
    (f"{B}{{ 42 \\, }}", "42", True),
    (f"{B}{{-3}}", "-3", True),
    (f"{B}{{}}", "0", False),
    (f"{B}{{42}} then an unclosed {B}{{", "42", True),
    ("\\fbox{42}", "42", True),
    (f"{B} 42", "42", True),
    (f"{B}{{42}}.", "42", True),
    ("the answer is 42", "42", False),  # AIME convention: only \boxed counts
    (f"{B}{{(B)}}", "42", False),
    (f"{B}{{421}}", "42", False),
    (f"{B}{{4}}{B}{{2}}", "42", False),
    ("", "42", False),
]

CHOICE = [
    ("(B)", "(B)", True),
    ("Answer: B", "(B)", True),
    ("**B**", "B", True),
    ("The answer is (B).", "(B)", True),
    ("The answer is (B), not (A).", "(B)", True),
    ("The answer is B, since (A) is closed.", "(B)", True),
    ("**Answer:** B\n\nExplanation: (A) and (C) are busy slots.", "(B)", True),
    ("(A) is wrong, (C) is wrong, so (D)", "(D)", True),
    ("Between (A) and (B), the answer is (B)", "(B)", True),
    ("Between (A) and (B), the answer is (B)", "(A)", False),
    (f"{B}{{C}}", "(C)", True),
    (f"{B}{{\\text{{C}}}}", "(C)", True),
    (f"${B}{{(C)}}$", "C", True),
    (f"The answer is \\({B}{{B}}\\)", "B", True),
    ("**Answer:** (C)", "(C)", True),
    ("**Answer: (C)**", "(C)", True),
    ("Answer: **B**", "(B)", True),
    (f"Final Answer: {B}{{D}}", "(D)", True),
    ("So the answer is: (D)", "(D)", True),
    ("The correct option is D.", "(D)", True),
    ("which is option C.", "(C)", True),
    ("Options:\n(A) 6pm to 9pm\n(B) 7am to 11am\nSo the free slot is (B)", "(B)", True),
    ("Choices:\n(A) x\n(B) y\nI pick (B)", "(B)", True),
    ("The correct choice is (C)", "(C)", True),
    ("Answer: D) 2pm to 6pm", "(D)", True),
    ("Answer: (A).", "(A)", True),
    ("answer:A", "(A)", True),
    ("ANSWER: B", "(B)", True),
    ("Answer - C", "(C)", True),
    ("**(D)**", "(D)", True),
    ("Reasoning...\n\nB", "(B)", True),
    ("Reasoning...\n\nB.", "(B)", True),
    ("Reasoning...\n[C]", "(C)", True),
    ("The free slot is 2pm to 6pm (D).", "(D)", True),
    ("<think>I think it's (A)</think>\n\nThe answer is (C)", "(C)", True),
    ("<think>I think it's (A)</think>\n\nThe answer is (C)", "(A)", False),
    ("<think>the answer is (A)</think>", "(A)", False),  # nothing after </think>
    ("Answer: I think the answer is (C)", "(C)", True),
    ("Answer: Between 6pm and 9pm", "(B)", False),  # "Between" is not the letter B
    (f"{B}{{Between 6pm and 9pm}}", "(B)", False),
    (f"{B}{{\\textbf{{(B)}}}}", "(B)", True),
    (f"{B}{{B. 2pm to 6pm}}", "(B)", True),
    ("A careful reading shows (B)", "(B)", True),
    ("A careful reading shows (B)", "(A)", False),  # the article "A" is no answer
    ("I choose A because it is free", "(A)", False),  # bare letter inside a sentence
    ("Answer: E", "(E)", True),  # the demo's synthetic variants go up to H
    ("Answer: I", "(I)", False),  # "Answer: I think" is no answer: I and J are excluded
    ("I don't know", "(A)", False),
    ("", "(A)", False),
]

FOLIO = [
    ("True", "True", True),
    ("false.", "False", True),
    ("TRUE", "True", True),
    ("The conclusion is **Uncertain**.", "Uncertain", True),
    ("Answer: Unknown", "Uncertain", True),
    ("Uncertain", "Unknown", True),  # FOLIO train writes Uncertain as Unknown
    ("Uncertain.", "uncertain", True),
    ("True", " True ", True),
    ("It is not clear whether premise 2 is true. Therefore the answer is False.", "False", True),
    ("Answer: False\n\nThis is because premise 3 is true.", "False", True),
    ("The statement is False. Thus, True is not the label.", "False", True),
    ("<think>True? No, wait...</think> **False**", "False", True),
    ("<think>True? No, wait...</think> **False**", "True", False),
    ("The conclusion is true.", "True", True),
    (f"{B}{{False}}", "False", True),
    (f"{B}{{\\text{{Uncertain}}}}", "Uncertain", True),
    ("**Final Answer:** Uncertain", "Uncertain", True),
    ("Answer: **True**", "True", True),
    ("True or False? Neither: Uncertain", "Uncertain", True),
    ("We cannot determine it, so it's uncertain", "Uncertain", True),
    ("That is untrue", "True", False),  # no whole word
    ("A falsehood", "False", False),
    ("It cannot be determined", "Uncertain", False),
    ("Label: false", "False", True),
    ("Is the conclusion True, False, or Uncertain? It is Uncertain.", "Uncertain", True),
    ("Final answer: **True**", "True", True),
    ("The answer is: False", "False", True),
    ("", "True", False),
]


@pytest.mark.parametrize("completion,reference,expected", AIME)
def test_aime(completion, reference, expected):
    assert grade("aime", completion, reference) is expected


@pytest.mark.parametrize("task", ["temporal", "gpqa"])
@pytest.mark.parametrize("completion,reference,expected", CHOICE)
def test_multiple_choice(task, completion, reference, expected):
    assert grade(task, completion, reference) is expected


@pytest.mark.parametrize("completion,reference,expected", FOLIO)
def test_folio(completion, reference, expected):
    assert grade("folio", completion, reference) is expected


def test_extracted_values():
    assert extract("aime", f"{B}{{ 042 }}") == 42
    assert extract("aime", "no box") is None
    assert extract("gpqa", "The answer is (B), not (A).") == "B"
    assert extract("folio", "**Unknown**") == "Uncertain"
    assert answer_text("a</think>b</think>c") == "c"
    assert answer_text("no think tags") == "no think tags"


def test_graders_for_synthetic_tasks():
    assert grade("number", "3 + 4 = 7", "7")
    assert grade("number", f"7 ... {B}{{8}}", "8")  # a box wins over the last number
    assert not grade("number", "3 + 4 = 7.5", "7")
    assert grade("choice", "Answer: (F)", "F")  # letters up to J
    assert grade("exact", "some work\n  Paris. \n", "paris")
    assert not grade("exact", "Paris\nLondon", "Paris")


def test_references_in_dataset_forms():
    assert normalize_reference("gpqa", "(A)") == "A"
    assert normalize_reference("temporal", " (d) ") == "D"
    assert normalize_reference("aime", "042") == 42
    assert normalize_reference("aime", f"{B}{{7}}") == 7
    assert normalize_reference("folio", "Unknown") == "Uncertain"


def test_bad_references_and_graders_are_user_errors():
    with pytest.raises(QuantLRMError, match="not an integer"):
        grade("aime", f"{B}{{1}}", "one")
    with pytest.raises(QuantLRMError, match="option letter"):
        grade("gpqa", "(A)", "42")
    with pytest.raises(QuantLRMError, match="True/False/Uncertain"):
        grade("folio", "True", "Yes")
    with pytest.raises(QuantLRMError, match="aime, choice, exact"):
        grade("mmlu", "(A)", "(A)")
