"""Import and validate the paircurate DAG with whatever Airflow is installed (2.x or 3.x).

    python deploy/airflow/check_dag.py        # exits non-zero on any problem
"""
import os
import sys

from airflow.models import DagBag

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> int:
    bag = DagBag(dag_folder=HERE)
    if bag.import_errors:
        print("import errors:", bag.import_errors)
        return 1
    dag = bag.dags.get("paircurate_nightly")
    if dag is None:
        print("no DAG paircurate_nightly in", HERE)
        return 1
    dag.validate()
    command = dag.get_task("curate").bash_command
    problems = []
    if "--run-id {{ ds }}" not in command:
        problems.append("the task does not pass --run-id {{ ds }}")
    if dag.max_active_runs != 1:
        problems.append("max_active_runs must be 1 (runs dedup against earlier ones)")
    if dag.default_args.get("retries", 0) < 1:
        problems.append("the task has no retries")
    if problems:
        print("; ".join(problems))
        return 1
    print(f"DAG {dag.dag_id} ok: schedule {dag.schedule if hasattr(dag, 'schedule') else ''}, "
          f"retries {dag.default_args['retries']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
