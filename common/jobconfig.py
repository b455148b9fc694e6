"""Validated training hyper-parameters (the domain side of TrainingConfig)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from common.errors import InvalidArgument


class JobConfig(BaseModel):
    model_config = ConfigDict(frozen=True, allow_inf_nan=False, extra="forbid")

    learning_rate: float = Field(0.15, gt=0, le=100, description="SGD step size")
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

    @model_validator(mode="after")
    def _dp_needs_no_loss_share(self) -> JobConfig:
        # The loss share is an un-noised function of both parties' data.
        if self.dp_epsilon > 0 and self.loss_every:
            raise ValueError("loss_every: expected 0 with dp_epsilon set (the loss share is not noised)")
        if self.dp_epsilon > 0 and self.tol > 0:
            raise ValueError("tol: expected 0 with dp_epsilon set (early stopping needs the loss)")
        return self

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
