"""A curriculum pretraining that records what each process trained on; run under accelerate.

    accelerate launch --multi_gpu --num_processes 2 tests/accelerate_scripts/curriculum_two_procs.py \
        OUT_DIR CONFIG override ...

Writes OUT_DIR/records_<rank>.json: per micro-batch {"step", "ids", "side", "same_views"}.
tests/test_curriculum.py imports Recorder and install from here, so both sides record alike.
Images are constant, their gray level their id (tests/test_curriculum.py writes them).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))   # the project root

from ddpm_landmarks.methods.registry import PRETRAINING_METHODS  # noqa: E402

_FACTORIES = dict(PRETRAINING_METHODS)        # the real factories, whatever a test monkeypatched since


def decode_ids(images) -> list[int] | None:
    """Gray level of each image's centre, None when it is not constant (augmented); the
    stretched grid's border pixels blend with the black outside."""
    side = images.shape[-1]
    lo, hi = side // 2 - 2, side // 2 + 2
    centre = ((images[:, 0, lo:hi, lo:hi].float() + 1) / 2 * 255).flatten(1)
    if (centre.max(1).values - centre.min(1).values).max() > 1e-3:
        return None
    return [int(round(v)) for v in centre[:, 0].tolist()]


class Killed(Exception):
    """Raised by the recorder to simulate a job killed at a given step."""


class Recorder:
    """Wraps a method's loss: per micro-batch (optimiser step it belongs to, image ids, side,
    whether the two SSL views are equal). The step is counted with accelerate's sync flag,
    which the engine's accumulate context sets before the loss of each micro-batch."""

    def __init__(self, first_step: int = 1, kill_at: int = 0):
        self.records: list[dict] = []
        self.step, self.kill_at = first_step, kill_at

    def wrap(self, method):
        from accelerate.state import GradientState
        inner = method.loss

        def loss(model, batch, generator=None):
            if self.kill_at and self.step == self.kill_at:
                raise Killed(f"simulated kill at step {self.step}")
            first = batch["view1"] if isinstance(batch, dict) else batch
            second = batch["view2"] if isinstance(batch, dict) else batch
            self.records.append({"step": self.step, "ids": decode_ids(first),
                                 "side": int(first.shape[-1]),
                                 "same_views": bool((first == second).all())})
            if GradientState().sync_gradients:
                self.step += 1
            return inner(model, batch, generator)

        method.loss = loss
        return method


def install(methods: dict, name: str, recorder: Recorder) -> None:
    """methods[name] builds the real method and wraps it (methods: PRETRAINING_METHODS, or a
    monkeypatch-able view of it)."""
    factory = _FACTORIES[name]
    methods[name] = lambda cfg: recorder.wrap(factory(cfg))


def main(argv: list[str]) -> int:
    from accelerate import PartialState

    from ddpm_landmarks.config.pretrain import PretrainConfig
    from ddpm_landmarks.config.schema import load_config
    from ddpm_landmarks.pretrain import pretrain
    out, config, overrides = Path(argv[0]), argv[1], argv[2:]
    cfg = load_config(config, overrides, cls=PretrainConfig)
    recorder = Recorder()
    install(PRETRAINING_METHODS, cfg.method, recorder)
    pretrain(cfg)
    rank = PartialState().process_index
    (out / f"records_{rank}.json").write_text(json.dumps(recorder.records))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
