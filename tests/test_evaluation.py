"""The trainers' evaluation (train/evaluation.py) in one process: a failing sample is recorded, not fatal."""
from __future__ import annotations

from types import SimpleNamespace

import torch

from ray_finetune.spec import Duration
from ray_finetune.train.evaluation import Evaluation
from ray_finetune.train.models import load_model, load_tokenizer
from ray_finetune.train.plan import make_plan


def test_an_eval_prompt_that_cannot_be_sampled_is_recorded_and_training_goes_on(tiny_model):
    """Sampling runs inside the training processes; a kernel that cannot decode must not end a run of hours."""
    model = load_model(tiny_model)
    calls = []

    def generate(**kwargs):
        calls.append(kwargs)
        if len(calls) == 1:
            raise RuntimeError("no decoding kernel for this attention")
        return torch.cat([kwargs["input_ids"], kwargs["input_ids"][:, :2]], dim=1)

    model.generate = generate
    modes = []
    engine = SimpleNamespace(module=SimpleNamespace(lm=model), eval=lambda: modes.append("eval"),
                             train=lambda: modes.append("train"))
    plan = make_plan(rows=4, tokens=100, duration=Duration(value=1, unit="ep"), world_size=1, seed=0)
    evaluation = Evaluation(engine, None, ["first", "second"], load_tokenizer(tiny_model), "CHAT_COMPLETION", plan,
                            rank=0, world=1, device=torch.device("cpu"), sharded=False)
    before = torch.get_rng_state()
    result = evaluation.run(seed=7)
    assert result.loss is None and [g["prompt"] for g in result.generations] == ["first", "second"]
    assert result.generations[0]["generation"] == ("[generation failed: RuntimeError: no decoding kernel for this "
                                                   "attention]")
    assert not result.generations[1]["generation"].startswith("[generation failed")
    assert modes == ["eval", "train"]                     # back to training mode
    assert torch.equal(torch.get_rng_state(), before)     # training's random state untouched by the seeded samples
    assert "<|im_start|>user\nfirst" in load_tokenizer(tiny_model).decode(calls[0]["input_ids"][0])
