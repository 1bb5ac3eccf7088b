"""A Beam Python worker pool (the EXTERNAL environment's SDK harness service) on loopback only.

``python -m apache_beam.runners.worker.worker_pool_main`` binds every interface;
this starts the same servicer (Beam's own class) on 127.0.0.1 only.  Each
worker it starts is ``python -m apache_beam.runners.worker.sdk_worker_main``
run by this interpreter, so it imports the environment's paircurate.

    python deploy/spark/worker_pool.py --port 50000
"""
import argparse
import logging
import time

import grpc
from apache_beam.portability.api import beam_fn_api_pb2_grpc
from apache_beam.runners.worker.worker_pool_main import BeamFnExternalWorkerPoolServicer
from apache_beam.utils import thread_pool_executor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    # Keep-alive pings from the runner are allowed without data (as worker_pool_main does).
    options = [("grpc.http2.max_pings_without_data", 0), ("grpc.http2.max_ping_strikes", 0)]
    server = grpc.server(thread_pool_executor.shared_unbounded_instance(), options=options)
    bound = server.add_insecure_port(f"127.0.0.1:{args.port}")
    if bound != args.port:
        raise SystemExit(f"could not bind 127.0.0.1:{args.port}")
    beam_fn_api_pb2_grpc.add_BeamFnExternalWorkerPoolServicer_to_server(
        BeamFnExternalWorkerPoolServicer(use_process=True), server)
    server.start()
    logging.info("Beam worker pool listening on 127.0.0.1:%d", bound)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.stop(0)


if __name__ == "__main__":
    main()
