"""Task packs (PreMoe's task-adaptive expert retrieval, TAER): per-task expert patterns of one checkpoint, a
retrieval key per task, and loading of only the matched task's experts (`load_for_task`)."""

from moeprune.taskpack.load import TaskModel, load_for_task
from moeprune.taskpack.pack import TaskPack, TaskPackError

__all__ = ["TaskModel", "TaskPack", "TaskPackError", "load_for_task"]
