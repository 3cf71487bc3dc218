"""`train.py --tensorboard` (optional, beside the paper): the scalars of metrics.jsonl as TensorBoard events.

They go to OUT/tensorboard (`tensorboard --logdir OUT/tensorboard`): loss, masked_loss/q,
unmasked_loss/q and masked_acc/q per stream q, speed, and the validation figures when they are
computed. TensorBoard is an optional dependency (`pip install tensorboard`); metrics.jsonl holds
the same numbers without it.
"""
import os

from data import UsageError

try:
    from torch.utils.tensorboard import SummaryWriter
except ImportError:  # imported by train.py's checks: one line before any setup
    raise UsageError("--tensorboard needs the tensorboard package: pip install tensorboard (or leave the flag "
                     "out: metrics.jsonl holds the same numbers)") from None


def scalar_writer(out, step):
    """A function writing one metrics record (a dict with "step") as scalars. A resumed run (step > 0)
    hides the events its stopped predecessor logged past `step`, as metrics.jsonl is trimmed."""
    writer = SummaryWriter(os.path.join(out, "tensorboard"), purge_step=step + 1 if step else None)

    def write(record):
        for name, value in record.items():
            for i, v in enumerate(value) if isinstance(value, list) else [(None, value)]:
                if name not in ("step", "time"):
                    writer.add_scalar(name if i is None else f"{name}/{i}", v, record["step"])
        writer.flush()
    return write
