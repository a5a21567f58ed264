"""Few-shot evaluation (paper Sec. 3, A.2, B.1.4, B.1.5): benchmarks, protocol, metrics, reports.

    from flamingo.evaluation import EvalSettings, evaluate, load_data_config
    results = evaluate(model, ["coco"], load_data_config("data.yaml"), EvalSettings(shots=[0, 4]), "runs/eval")
"""

from flamingo.evaluation.data_config import DataConfig, load_data_config
from flamingo.evaluation.samples import EvalDataError, Sample
from flamingo.evaluation.settings import EvalSettings
from flamingo.evaluation.suite import evaluate
from flamingo.evaluation.tasks import TASKS, TaskSpec, get_task

__all__ = ["TASKS", "DataConfig", "EvalDataError", "EvalSettings", "Sample", "TaskSpec", "evaluate", "get_task",
           "load_data_config"]
