"""Spark sessions for reading Delta tables on a data-prep cluster (data_prep_cluster_id)."""
from __future__ import annotations

from functools import lru_cache
from typing import Any

from ray_finetune.errors import ValidationError


@lru_cache(maxsize=4)
def session(cluster_id: str) -> Any:
    """`local` → an in-process Spark session; `sc://host:port` → a Spark Connect session to that server."""
    try:
        from pyspark.sql import SparkSession
    except ImportError:
        raise ValidationError("data_prep_cluster_id", "pyspark is not installed",
                              expected="pip install pyspark (and a Java runtime for 'local')") from None
    if cluster_id == "local":
        return (SparkSession.builder.master("local[1]").appName("ray_finetune-data-prep")
                .config("spark.ui.enabled", "false").config("spark.sql.shuffle.partitions", "1").getOrCreate())
    if cluster_id.startswith("sc://"):
        return SparkSession.builder.remote(cluster_id).getOrCreate()
    raise ValidationError("data_prep_cluster_id", f"{cluster_id!r} is not a Spark cluster this service can reach",
                          expected="'local' or a Spark Connect URL 'sc://host:port'")


def check_cluster_id(cluster_id: str | None) -> None:
    if cluster_id is not None and cluster_id != "local" and not cluster_id.startswith("sc://"):
        raise ValidationError("data_prep_cluster_id", f"{cluster_id!r} is not a Spark cluster this service can reach",
                              expected="'local' or a Spark Connect URL 'sc://host:port'")
