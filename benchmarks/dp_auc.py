"""Breast AUC under differential privacy: the demo job (80/20 split, the
held-out ids as holdout) at several target epsilons, on a real three-process
federation through the assistant. `python -m benchmarks.dp_auc [--key-bits N]`."""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from vfl.cli.client import VflClient
from vfl.cli.federation import LocalFederation
from vfl.cli.main import BUNDLED_ACTIVE, BUNDLED_PASSIVE, split_ids
from vfl.common.jobconfig import job_config
from vfl.v1 import client_pb2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--key-bits", type=int, default=2048)
    parser.add_argument("--epsilons", default="0,1,3,8")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    train, test, labels = split_ids(BUNDLED_ACTIVE, "id", "y", 0.2, 42)
    y = np.array([labels[i] for i in test])
    out = []
    with tempfile.TemporaryDirectory(prefix="vfl-dp-auc-") as tmp:
        fed = LocalFederation(
            Path(tmp),
            BUNDLED_ACTIVE,
            BUNDLED_PASSIVE,
            key_bits=args.key_bits,
            tls=False,
            extra_env={"VFL_MAX_MODELS_PER_PEER": "1000"},
        )
        with fed, VflClient(fed.active_address, timeout_s=600) as c:
            c.wait_ready(60)
            for eps in (float(e) for e in args.epsilons.split(",")):
                aucs, spent = [], None
                for r in range(args.repeats if eps else 1):
                    fields: dict[str, object] = {"epochs": args.epochs, "batch_size": args.batch_size, "loss_every": 0}
                    if eps:
                        fields["dp_epsilon"] = eps
                    job = f"dp-{eps:g}-{r}"
                    c.start_training(job_config(**fields), train, job, holdout_ids=test)
                    final = c.wait(job)
                    assert final.state == client_pb2.JOB_STATE_SUCCEEDED, final.error
                    spent = final.dp_epsilon_spent if final.HasField("dp_epsilon_spent") else None
                    aucs.append(float(roc_auc_score(y, c.predict(job, test))))
                rec = {
                    "epsilon": eps or None,
                    "epsilon_spent": spent,
                    "auc_mean": round(float(np.mean(aucs)), 4),
                    "auc_min": round(min(aucs), 4),
                    "auc_max": round(max(aucs), 4),
                    "runs": len(aucs),
                }
                print(json.dumps(rec), flush=True)
                out.append(rec)
    print(json.dumps({"key_bits": args.key_bits, "epochs": args.epochs, "batch_size": args.batch_size, "results": out}))


if __name__ == "__main__":
    main()
