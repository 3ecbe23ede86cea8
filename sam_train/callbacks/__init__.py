"""Reliability callbacks and plugins: atomic weights-only checkpoints, preemption, non-finite steps,
rank failures, bad-sample monitoring, fault injection for tests."""

from sam_train.callbacks.checkpoint_io import AtomicCheckpointIO, load_weights_only
from sam_train.callbacks.data_skips import SkipMonitor
from sam_train.callbacks.distributed import RankFailureReporter
from sam_train.callbacks.epoch_end import EpochEndCheckpoint
from sam_train.callbacks.fault_injection import FaultInjection, InjectedFault
from sam_train.callbacks.nonfinite import NonFiniteError, NonFiniteGuard
from sam_train.callbacks.preemption import EXIT_REQUEUE, Preempted, PreemptionCheckpoint
from sam_train.callbacks.progress import StepProgressBar

__all__ = [
    "EXIT_REQUEUE",
    "AtomicCheckpointIO",
    "EpochEndCheckpoint",
    "FaultInjection",
    "InjectedFault",
    "NonFiniteError",
    "NonFiniteGuard",
    "Preempted",
    "PreemptionCheckpoint",
    "RankFailureReporter",
    "SkipMonitor",
    "StepProgressBar",
    "load_weights_only",
]
