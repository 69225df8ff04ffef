"""Learning-rate schedules computed on the server from the number of applied steps.

A schedule is a factor on each parameter group's ``lr``. ``s`` is the number of the step being applied (1 for the
first); skipped steps are not applied, so they do not advance it::

    constant                                   1
    linear_warmup(warmup_steps=W)              min(1, s / W)
    cosine(warmup_steps=W, total_steps=T,      s / W                                         while s <= W
           min_lr_ratio=r)                     r + (1 - r) * (1 + cos(pi * min(1, (s - W) / (T - W)))) / 2
    step(step_size=S, gamma=g)                 g ** ((s - 1) // S)     (torch's StepLR)
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Schedule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    def factor(self, s: int) -> float:
        raise NotImplementedError


class Constant(_Schedule):
    name: Literal["constant"] = "constant"

    def factor(self, s: int) -> float:
        return 1.0


class LinearWarmup(_Schedule):
    name: Literal["linear_warmup"]
    warmup_steps: int = Field(ge=1)

    def factor(self, s: int) -> float:
        return min(1.0, s / self.warmup_steps)


class Cosine(_Schedule):
    name: Literal["cosine"]
    total_steps: int = Field(ge=1)
    warmup_steps: int = Field(default=0, ge=0)
    min_lr_ratio: float = Field(default=0.0, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _warmup_within_total(self) -> Cosine:
        if self.warmup_steps >= self.total_steps:
            raise ValueError("warmup_steps must be smaller than total_steps")
        return self

    def factor(self, s: int) -> float:
        if s <= self.warmup_steps:
            return s / self.warmup_steps
        progress = min(1.0, (s - self.warmup_steps) / (self.total_steps - self.warmup_steps))
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * (1 + math.cos(math.pi * progress)) / 2


class StepDecay(_Schedule):
    name: Literal["step"]
    step_size: int = Field(ge=1)
    gamma: float = Field(default=0.1, gt=0.0)

    def factor(self, s: int) -> float:
        try:
            return float(self.gamma ** ((s - 1) // self.step_size))
        except OverflowError:  # gamma > 1 for long enough: the session refuses the step (lr out of range)
            return math.inf


Schedule = Annotated[Constant | LinearWarmup | Cosine | StepDecay, Field(discriminator="name")]
