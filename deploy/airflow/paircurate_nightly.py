"""Apache Airflow DAG: the paircurate nightly incremental job.

Each night runs `paircurate run --run-id {{ ds }}` on that day's URL lists.
The run id makes the task idempotent: a retry of a run that succeeded is a
no-op, a retry of one that failed half-way starts it cleanly, and every run
dedups against the ledgers of all earlier runs under the dataset root.

Set the Airflow Variables paircurate_input (a pattern with {{ ds }} in it),
paircurate_root and optionally paircurate_config (default: nightly).
"""
from __future__ import annotations

import datetime

from airflow import DAG

try:  # Airflow 3 moved the operator into the standard provider
    from airflow.providers.standard.operators.bash import BashOperator
except ImportError:  # Airflow 2
    from airflow.operators.bash import BashOperator

DEFAULT_ARGS = {
    "owner": "data",
    "retries": 3,
    "retry_delay": datetime.timedelta(minutes=20),
    "retry_exponential_backoff": True,
    "execution_timeout": datetime.timedelta(hours=20),
}

with DAG(
    dag_id="paircurate_nightly",
    description="Curate the day's image-text URL lists into WebDataset shards",
    schedule="0 2 * * *",
    start_date=datetime.datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,  # runs dedup against earlier ones: keep them in order
    default_args=DEFAULT_ARGS,
    tags=["paircurate", "datasets"],
) as dag:
    BashOperator(
        task_id="curate",
        bash_command=(
            "paircurate run"
            " --config {{ var.value.get('paircurate_config', 'nightly') }}"
            " --input '{{ var.value.paircurate_input }}'"
            " --output '{{ var.value.paircurate_root }}'"
            " --run-id {{ ds }}"
        ),
        env={"HF_HUB_OFFLINE": "0"},
        append_env=True,
    )
