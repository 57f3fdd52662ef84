"""Zero-shot multiple-choice evaluation (ARC, HellaSwag, PIQA, SciQ, WinoGrande, JSONL tasks)."""

from polycom_jax.downstream.scoring import evaluate_checkpoint
from polycom_jax.downstream.scoring import evaluate_tasks
from polycom_jax.downstream.scoring import format_table
from polycom_jax.downstream.scoring import write_results
from polycom_jax.downstream.tasks import load_tasks
from polycom_jax.downstream.tasks import MultipleChoice
from polycom_jax.downstream.tasks import TASKS
from polycom_jax.downstream.tasks import TaskData
