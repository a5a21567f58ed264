"""Few-shot evaluation (paper Sec. 3, A.2, B.1.4, B.1.5): benchmarks, protocol, metrics, reports.

    from flamingo.evaluation import EvalSettings, evaluate, load_data_config
    results = evaluate(model, ["coco"], load_data_config("data.yaml"), EvalSettings(shots=[0, 4]), "runs/eval")
"""

from flamingo.data.benchmarks.data_config import DataConfig, load_data_config
from flamingo.data.benchmarks.samples import EvalDataError, Sample
from flamingo.data.benchmarks.tasks import TASKS, TaskSpec, get_task
from flamingo.evaluation.settings import EvalSettings
from flamingo.evaluation.suite import evaluate

__all__ = ["TASKS", "DataConfig", "EvalDataError", "EvalSettings", "Sample", "TaskSpec", "evaluate", "get_task",
           "load_data_config"]
