"""Settings shared by the three services.

Every setting comes from an environment variable with the prefix ``KAIKU_``. The classes are small
and per concern; each service builds the ones it needs in ``create_app()`` / ``__main__`` and passes
them down. Nothing here connects to anything.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.common.erasure import DEV_ERASURE_SALT


class KafkaSettings(BaseSettings):
    """How to reach the Kafka-protocol cluster and what the topics are called."""

    model_config = SettingsConfigDict(
        env_prefix="KAIKU_KAFKA_", extra="ignore", populate_by_name=True
    )

    bootstrap_servers: str = "127.0.0.1:9092"
    topic_prefix: str = Field(default="kaiku.", validation_alias="KAIKU_TOPIC_PREFIX")
    client_id: str = "kaiku"
    # Production Kafka: on. The embedded Tansu broker does not support the idempotent producer.
    enable_idempotence: bool = True
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    # How long an HTTP ingress waits for the broker's acknowledgement before answering 503.
    produce_timeout_seconds: float = 10.0
    # Create missing topics on start (convenient for dev; production uses `kaiku topics create`).
    create_topics: bool = True
    partitions: int = 6
    replication_factor: int = 1
    # Retention (retention.ms) of the topics `kaiku topics create` makes, -1 for forever: a week
    # for the flowing topics (erasure cannot reach messages already on them), two for the dead
    # letters (time to look and replay; they hold contact details too). See docs/topics.md.
    retention_ms: int = Field(default=7 * 24 * 3600 * 1000, ge=-1)
    dlq_retention_ms: int = Field(default=14 * 24 * 3600 * 1000, ge=-1)
    # Consumer loop tuning.
    max_batch: int = 500
    poll_timeout_ms: int = 200
    # How often each consumer reads its partitions' end offsets for kaiku_consumer_lag, also
    # while it is idle or a batch is stuck (else the gauge only moves when a batch finishes).
    lag_refresh_seconds: float = Field(default=15.0, gt=0)
    # Group membership: a consumer joins a group in about half the session timeout on Tansu.
    session_timeout_ms: int = 10_000
    heartbeat_interval_ms: int = 3_000
    # Dead-letter breaker: stop the consumer when more than this share of a window goes to the DLQ.
    dlq_breaker_ratio: float = 0.5
    dlq_breaker_window: int = 200

    def topic(self, name: str) -> str:
        return f"{self.topic_prefix}{name}"


class DatabaseSettings(BaseSettings):
    """The service's own database. SQLite is the embedded default, PostgreSQL the production one."""

    model_config = SettingsConfigDict(
        env_prefix="KAIKU_DATABASE_", extra="ignore", populate_by_name=True
    )

    url: str = "sqlite+aiosqlite:///var/kaiku.db"
    # Optional PostgreSQL schema (search_path) holding this service's tables.
    schema_name: str | None = Field(default=None, validation_alias="KAIKU_DATABASE_SCHEMA")
    pool_size: int = 10
    echo: bool = False
    # On start: "auto" migrates the service's schema to this release (the embedded default),
    # "check" only verifies it is current (production: the migration Job runs `kaiku migrate`).
    # Either way a service refuses to run against a schema newer than its code.
    migrate: Literal["auto", "check"] = "auto"


class HttpSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KAIKU_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = 8000
    # Bearer token for API and admin routes.
    api_token: SecretStr | None = None
    # Largest request body accepted, in bytes.
    max_body_bytes: int = 1_048_576
    # KAIKU_BODY_TIMEOUT_SECONDS: a request's whole body must arrive within this many seconds
    # of its headers, else 408 and the connection is closed (a client trickling its body, as
    # in a slowloris attack, holds nothing open for longer). 1 MiB in 30 s is 35 kB/s.
    body_timeout_seconds: float = Field(default=30.0, gt=0)
    log_level: str = "INFO"
    # KAIKU_SHUTDOWN_SECONDS: from SIGTERM to exit, below the pod's grace period (Kubernetes'
    # default is 30 s, less any preStop). Half of it for HTTP requests in flight, three quarters
    # (from the SIGTERM) for the consumers' batches in hand and the workers' rounds, the rest
    # for flushing the producer and closing connections (docs/operations-shutdown.md).
    shutdown_seconds: float = Field(default=20.0, ge=2.0)
    # KAIKU_GC_THRESHOLD: allocations between the garbage collector's youngest-generation runs
    # once the service has started (Python's default is 700; 0 keeps it). A batch or a score
    # report builds tens of thousands of objects that all stay alive, which the default
    # rescans over and over (docs/operations.md, "Garbage collection").
    gc_threshold: int = Field(default=20_000, ge=0)


class LinkSettings(BaseSettings):
    """Survey-link tokens: signed with a key id so keys can rotate."""

    model_config = SettingsConfigDict(env_prefix="KAIKU_", extra="ignore")

    # Public base URL of the collector (survey and unsubscribe pages), as customers reach it.
    public_url: str = "http://127.0.0.1:8000"
    # "kid:secret" pairs, comma separated; the first signs new links, all verify.
    link_keys: SecretStr = SecretStr("0:insecure-development-key-change-me")

    @field_validator("public_url")
    @classmethod
    def _strip_slash(cls, value: str) -> str:
        return value.rstrip("/")


class ErasureSettings(BaseSettings):
    """Erasure (``DELETE /v1/customers/{id}``): the key of the salted hashes that opt-outs keep
    after their customer is erased. Production must set it, the same in every service, and never
    change it: opt-outs hashed with another salt are no longer recognised."""

    model_config = SettingsConfigDict(env_prefix="KAIKU_", extra="ignore")

    erasure_salt: SecretStr = SecretStr(DEV_ERASURE_SALT)


class ProgramSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KAIKU_", extra="ignore")

    program: Path = Path("deploy/local/program.yaml")
