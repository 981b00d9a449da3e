"""GLUE / SuperGLUE task specs, their data and metrics, and the causal-LM prompt view of each task."""

from .loading import DATA_DIR_ENV, TaskData, load_task_data, user_task
from .metrics import METRICS, compute_metrics
from .specs import TASKS, TaskSpec, get_task, task_names

__all__ = ["DATA_DIR_ENV", "METRICS", "TASKS", "TaskData", "TaskSpec", "compute_metrics", "get_task",
           "load_task_data", "task_names", "user_task"]
