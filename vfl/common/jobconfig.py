"""Validated training hyper-parameters (the domain side of TrainingConfig)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from vfl.common.errors import InvalidArgument
from vfl.common.protocol.optimizers import DecayName, OptimizerName
from vfl.common.protocol.residual import ResidualModel, residual_model


class JobConfig(BaseModel):
    model_config = ConfigDict(frozen=True, allow_inf_nan=False, extra="forbid")

    learning_rate: float = Field(0.15, gt=0, le=100, description="step size (before decay)")
    batch_size: int = Field(64, ge=2, le=1_000_000, description="rows per mini-batch")
    epochs: int = Field(5, ge=1, le=100_000, description="passes over the training rows")
    l2: float = Field(0.01, ge=0, le=1e6, description="L2 penalty, intercept excluded")
    seed: int = Field(42, ge=0, lt=2**63, description="batch order (never initial weights: each party draws its own)")
    tol: float = Field(0.0, ge=0, description="early stop when |loss change| < tol (0 = off)")
    loss_every: int = Field(1, ge=0, le=1_000_000, description="loss check period in iterations (0 = never)")
    standardize: bool = Field(True, description="each party standardises its own columns")
    init_scale: float = Field(0.01, gt=0, le=10, description="std of the random initial weights")
    allow_small_batch: bool = Field(
        False, description="ask for batches down to 2 * max(p_A + 2, p_B + 1); needs B's consent"
    )
    max_iterations: int = Field(0, ge=0, le=2**32 - 1, description="stop after this many iterations (0 = no limit)")
    dp_epsilon: float = Field(0.0, ge=0, le=1e3, description="differential privacy target epsilon (0 = off)")
    dp_delta: float = Field(1e-5, gt=0, lt=0.1, description="differential privacy delta")
    model: Literal["logistic", "linear"] = Field(
        "logistic", description="logistic regression (Taylor residual) or linear regression (squared loss)"
    )
    optimizer: OptimizerName = Field("sgd", description="each party's update rule (each keeps its own state)")
    momentum: float = Field(0.9, ge=0, lt=1, description="momentum / nesterov: velocity decay")
    beta1: float = Field(0.9, ge=0, lt=1, description="adam: first-moment decay")
    beta2: float = Field(0.999, ge=0, lt=1, description="adam: second-moment decay")
    rho: float = Field(0.9, ge=0, lt=1, description="rmsprop: squared-gradient decay")
    epsilon: float = Field(1e-8, gt=0, le=1, description="adagrad / rmsprop / adam: denominator floor")
    lr_decay: DecayName = Field("none", description="learning-rate schedule over iterations")
    decay_rate: float = Field(0.5, gt=0, le=100, description="lr_decay's rate r")
    decay_steps: int = Field(100, ge=1, le=2**32 - 1, description="lr_decay's period k in iterations")
    validation_every: int = Field(
        0, ge=0, le=2**32 - 1, description="validation loss on the holdout rows every this many iterations (0 = off)"
    )
    patience: int = Field(0, ge=0, le=2**32 - 1, description="stop after this many checks without improvement")
    residual: Literal["taylor", "poly5"] = Field(
        "taylor", description="the sigmoid's approximation: Taylor's, or a degree-5 fit (docs/POLY5.md)"
    )

    @model_validator(mode="after")
    def _dp_needs_no_loss_share(self) -> JobConfig:
        # The loss share is an un-noised function of both parties' data.
        if self.dp_epsilon > 0 and self.loss_every:
            raise ValueError("loss_every: expected 0 with dp_epsilon set (the loss share is not noised)")
        if self.dp_epsilon > 0 and self.validation_every:
            raise ValueError("validation_every: expected 0 with dp_epsilon set (the validation loss is not noised)")
        if self.patience and not self.validation_every:
            raise ValueError("patience: needs validation_every (the checks it counts)")
        if self.dp_epsilon > 0 and self.tol > 0:
            raise ValueError("tol: expected 0 with dp_epsilon set (early stopping needs the loss)")
        return self

    @model_validator(mode="after")
    def _decay_lowers_the_rate(self) -> JobConfig:
        if self.lr_decay in ("step", "exponential") and self.decay_rate > 1:
            raise ValueError(f"decay_rate: expected at most 1 for {self.lr_decay} decay (it would grow the rate)")
        return self

    @model_validator(mode="after")
    def _dp_is_for_logistic(self) -> JobConfig:
        # The DP calibration bounds the logistic residual share; a linear
        # residual u - y has no such bound.
        if self.dp_epsilon > 0 and self.model == "linear":
            raise ValueError("dp_epsilon: expected 0 with model linear (DP is calibrated for logistic regression)")
        return self

    @model_validator(mode="after")
    def _poly5_runs_the_plain_steps(self) -> JobConfig:
        # The polynomial residual's loss and validation shares are not built,
        # and its shares are not bounded as DP's calibration needs.
        if self.residual == "poly5":
            if self.model != "logistic":
                raise ValueError("residual: poly5 approximates the sigmoid: expected model logistic")
            for name in ("loss_every", "validation_every", "dp_epsilon", "tol"):
                if getattr(self, name):
                    raise ValueError(f"{name}: expected 0 with residual poly5 (its loss check is not built yet)")
        return self

    @property
    def residual_model(self) -> ResidualModel:
        """The share formulas of the model (Taylor's for logistic); a poly5
        job runs its residual through the sessions (TrainingPlan.of)."""
        return residual_model(self.model)

    def validation_due(self, iteration: int, total: int) -> bool:
        """Whether the weights at the start of `iteration` (after `iteration`
        updates; `total` = after the last) are checked on the validation rows."""
        every = self.validation_every
        return bool(every) and 0 < iteration <= total and (iteration % every == 0 or iteration == total)

    @property
    def dp(self) -> bool:
        return self.dp_epsilon > 0


def job_config(**fields: object) -> JobConfig:
    """JobConfig from fields, with a validation error naming the field."""
    try:
        return JobConfig.model_validate(fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        if not where:  # a check across fields names its field in the message
            raise InvalidArgument(f"config.{first['msg'].removeprefix('Value error, ')}") from None
        raise InvalidArgument(f"config.{where}: {first['msg']}") from None
