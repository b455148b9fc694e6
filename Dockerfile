# One image for all three vfl services; the command picks the role:
#   python -m vfl.services.passive | python -m vfl.services.assistant | python -m vfl.services.active (default)
#   vfl demo-client --address active:50051 --labels-csv /app/data/breast_hetero_guest.csv --tls-dir /certs
#   vfl certs --out /certs
# Configuration is by VFL_* environment variables (see vfl/common/settings.py and docker-compose.yml);
# a service needs its TLS files (VFL_TLS_DIR=/certs) or VFL_INSECURE=true.
# Plain `docker build` (no BuildKit features), so it builds with the legacy builder too.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

WORKDIR /app

# Dependencies first, in their own layer: it depends only on these two files, so editing the
# code does not reinstall them. The runtime dependencies come from pyproject.toml and every
# version (transitive ones included) from requirements.lock, used as constraints; installing
# the lock with -r would also put the dev tools (mypy, ruff, pytest, grpcio-tools) in the image.
# libsodium: the ristretto255 group of the private set intersection (pysodium loads it).
RUN apt-get update && apt-get install -y --no-install-recommends libsodium23 && rm -rf /var/lib/apt/lists/*
# EXTRAS (comma-separated optional-dependency groups of pyproject.toml, e.g. ray for
# docker-compose.ray.yml) adds those groups, at the lock's versions too.
ARG EXTRAS=""
COPY pyproject.toml requirements.lock ./
RUN python -c 'import os, tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; extras = [e for e in os.environ.get("EXTRAS", "").split(",") if e]; print("\n".join(p["dependencies"] + [d for e in extras for d in p["optional-dependencies"][e]]))' > /tmp/runtime.txt \
 && pip install -r /tmp/runtime.txt -c requirements.lock \
 && rm /tmp/runtime.txt

# The code and the bundled data (/app/data). --no-deps: everything it needs is installed above;
# `pip check` fails the build if the lock and pyproject.toml ever disagree.
COPY . .
RUN pip install --no-deps . \
 && pip check \
 && rm -rf build ./*.egg-info

# Unprivileged user; /var/lib/vfl is its private data dir (keys, models), /certs the TLS files
# (`vfl certs --out /certs`). A named volume mounted there starts as a copy of this directory,
# so it keeps this owner and mode.
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/vfl --shell /usr/sbin/nologin vfl \
 && mkdir -p /var/lib/vfl /certs \
 && chown vfl:vfl /var/lib/vfl /certs \
 && chmod 700 /var/lib/vfl /certs
USER vfl

# Container defaults: listen on all interfaces, keep state in the data dir.
ENV VFL_HOST=0.0.0.0 \
    VFL_DATA_DIR=/var/lib/vfl
VOLUME ["/var/lib/vfl"]
# active, passive, assistant
EXPOSE 50051 50052 50053

CMD ["python", "-m", "vfl.services.active"]
