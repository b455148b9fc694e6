"""Start a real service with one deliberately planted regression (tests only).

`python -m tests.attacks.planted` reads VFL_PLANT (a name in PLANTS) and
VFL_PLANT_MODULE (the service to run, e.g. `services.passive`), undoes one
privacy fix by monkeypatching it back to the old, leaky behaviour, then runs
the service exactly as `python -m VFL_PLANT_MODULE` would. Each attack test
runs against the real service and against its planted twin: the attack must
fail on the first and succeed on the second, which shows that the test would
catch the regression. Nothing here is imported by the product.
"""

from __future__ import annotations

import os
import runpy
import sys
from collections.abc import Callable

PLANTS: dict[str, Callable[[], None]] = {}


def plant(name: str) -> Callable[[Callable[[], None]], Callable[[], None]]:
    def register(fn: Callable[[], None]) -> Callable[[], None]:
        PLANTS[name] = fn
        return fn

    return register


def main() -> None:
    name = os.environ.get("VFL_PLANT", "")
    module = os.environ.get("VFL_PLANT_MODULE", "")
    if name not in PLANTS or not module:
        print(f"planted: VFL_PLANT must be one of {sorted(PLANTS)} and VFL_PLANT_MODULE set", file=sys.stderr)
        raise SystemExit(2)
    PLANTS[name]()
    print(f"planted: regression {name!r} planted in {module}", file=sys.stderr, flush=True)
    runpy.run_module(module, run_name="__main__", alter_sys=True)


# --- the plants (each undoes one fix; see the attack test that names it) -----


@plant("paillier-square-randomness")
def _paillier_square_randomness() -> None:
    """tests/attacks/test_paillier_randomness.py: the fast Paillier backend's
    old randomness. Hiding encryptions are h_s^r again, r of 256 + 128 + 80
    bits from a fixed-base table, with DJN's h_s = (-x^2)^n, always a square
    modulo a prime factor p = 1 mod 4 of the key holder's n."""
    import secrets

    import gmpy2

    from common.crypto import fast_backend

    def square_base(n: gmpy2.mpz, n_square: gmpy2.mpz) -> gmpy2.mpz:
        x = fast_backend._random_unit(n)
        return gmpy2.powmod((-(x * x)) % n, n, n_square)

    def short_hiding(self: fast_backend._PaillierPublicOps) -> gmpy2.mpz:
        return self.randomness.table.pow(secrets.randbits(256 + 128 + 80))

    fast_backend.paillier_short_base = square_base
    fast_backend._PaillierPublicOps.hiding_randomiser = short_hiding  # type: ignore[method-assign]


@plant("assistant-any-target")
def _assistant_any_target() -> None:
    """C tunnels to whatever a CONNECT names, not only to its upstream
    (tests/attacks/test_assistant.py, attack 4)."""
    from services.assistant import proxy

    proxy.TunnelProxy.route = lambda self, target: proxy.split_target(target)  # type: ignore[method-assign]


if __name__ == "__main__":
    main()
