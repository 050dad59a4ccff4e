"""The engine shared by every method: training (single process, CUDA/bf16, torchrun + DDP),
checkpoints with full RNG state, whole-volume sliding-window synthesis and run records.

    from mmdm.engine import TrainConfig, train, evaluate_run, synthesize_volume
"""

from mmdm.engine.checkpoint import CheckpointManager, capture_rng, load_checkpoint, restore_rng, save_checkpoint
from mmdm.engine.infer import load_run_method, synthesize_files, synthesize_volume
from mmdm.engine.runs import evaluate_run, is_finished, load_summary, run_paths, run_status
from mmdm.engine.train import EMAConfig, TrainConfig, Trainer, epoch_batches, train

__all__ = ["CheckpointManager", "EMAConfig", "TrainConfig", "Trainer", "capture_rng", "epoch_batches",
           "evaluate_run", "is_finished", "load_checkpoint", "load_run_method", "load_summary", "restore_rng",
           "run_paths", "run_status", "save_checkpoint", "synthesize_files", "synthesize_volume", "train"]
