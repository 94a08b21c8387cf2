"""Clinical tasks as registered units (prompt builder + parser + result type); see :mod:`medlens.tasks.base`.

Task modules are imported only when their task is used.
"""

from __future__ import annotations

import importlib

from medlens.registry import Registry
from medlens.tasks.base import Parsed, ParseError, Task, TaskBuild, TaskOption, TaskOptions, TaskRequest

#: task name -> "module:Class"
TASKS: Registry[str] = Registry("task")
for _name, _target in {
    "qa": "medlens.tasks.qa:QuestionTask",
    "ehr-qa": "medlens.tasks.ehr:EhrQuestionTask",
    "lab-extract": "medlens.tasks.lab:LabExtractTask",
    "localize": "medlens.tasks.localize:LocalizeTask",
    "compare": "medlens.tasks.compare:CompareTask",
    "report": "medlens.tasks.report:ReportTask",
    "differential": "medlens.tasks.differential:DifferentialTask",
}.items():
    TASKS.add(_name, _target)


def task_class(name: str) -> type[Task]:
    """The class of the task registered as ``name`` (did-you-mean error otherwise)."""
    module, _, attr = TASKS.get(name).partition(":")
    return getattr(importlib.import_module(module), attr)


def get_task(name: str) -> Task:
    """An instance of the task registered as ``name``."""
    return task_class(name)()


__all__ = [
    "TASKS",
    "ParseError",
    "Parsed",
    "Task",
    "TaskBuild",
    "TaskOption",
    "TaskOptions",
    "TaskRequest",
    "get_task",
    "task_class",
]
