"""The engine shared by every method: training (single process, CUDA/bf16, torchrun + DDP),
checkpoints with full RNG state, whole-volume sliding-window synthesis and run records.

Modules, lowest first (each imports only modules of its own row or the rows above it)::

    rundir, checkpoint, distributed, batches, ema, panels   run directory, RNG state, processes, data order
    migrate                                                  old records -> resolved method configs
      -> spec                                                TrainConfig, building the method, run-dir guard
      -> train, infer                                        the Trainer; whole-volume synthesis
      -> evaluate                                            a run's evaluation and record
      -> cli                                                 `mmdm train / synthesize / evaluate-run`

    from mmdm.engine import TrainConfig, train, evaluate_run, synthesize_volume
"""

from mmdm.engine.checkpoint import CheckpointManager, capture_rng, load_checkpoint, restore_rng, save_checkpoint
from mmdm.engine.evaluate import evaluate_run
from mmdm.engine.infer import load_run_method, synthesize_files, synthesize_subjects, synthesize_volume
from mmdm.engine.rundir import RunLockedError, is_finished, load_summary, run_lock, run_paths, run_status
from mmdm.engine.migrate import migrate_record
from mmdm.engine.spec import TrainConfig, load_run_config, resolve, resolve_method_config
from mmdm.engine.train import Trainer, train
from mmdm.engine.batches import epoch_batches
from mmdm.optim import EMAConfig

__all__ = ["CheckpointManager", "EMAConfig", "RunLockedError", "TrainConfig", "Trainer", "capture_rng",
           "epoch_batches", "evaluate_run", "is_finished", "load_checkpoint", "load_run_config", "load_run_method",
           "load_summary", "migrate_record", "resolve", "resolve_method_config", "restore_rng", "run_lock", "run_paths", "run_status", "save_checkpoint", "synthesize_files",
           "synthesize_subjects", "synthesize_volume", "train"]
