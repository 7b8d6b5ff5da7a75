"""Reasoning benchmarks, answer graders, generation backends and reports (SPEC.md section 3).

Quick use::

    from quantlrm.eval import Task, evaluate, grade, GenerationConfig
    grade("aime", "... </think> so the answer is \\boxed{042}", "42")        # True
    task = Task.from_pairs("add", [("2+3=", "5")], grader="number")
    evaluate(model, [task], tokenizer=tok, gen=GenerationConfig(greedy=True, max_new_tokens=8))
    evaluate("path/to/model", "paper", sources={"aime": "aime.jsonl", "gpqa": "gpqa_diamond.csv"})
"""

from quantlrm.eval.backends import GenerationConfig, load_model, make_backend
from quantlrm.eval.graders import GRADERS, answer_text, extract, grade
from quantlrm.eval.runner import evaluate, perplexity
from quantlrm.eval.tasks import GROUPS, TASKS, Sample, Task, expand_task_names, load_task

__all__ = [
    "GRADERS",
    "GROUPS",
    "TASKS",
    "GenerationConfig",
    "Sample",
    "Task",
    "answer_text",
    "evaluate",
    "expand_task_names",
    "extract",
    "grade",
    "load_model",
    "load_task",
    "make_backend",
    "perplexity",
]
