"""One-shot: create the MLflow user the worker logs in as (idempotent), as the admin.

The admin's credentials are MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD; the worker's are
MERGEYARD_MLFLOW_USER / MERGEYARD_MLFLOW_PASSWORD. The worker is an ordinary user: it manages the models and
experiments it creates and reads the rest; it is not an admin.
"""

import os
import sys

from mlflow.exceptions import RestException
from mlflow.server import get_app_client

client = get_app_client("basic-auth", tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
user, password = os.environ["MERGEYARD_MLFLOW_USER"], os.environ["MERGEYARD_MLFLOW_PASSWORD"]
try:
    client.create_user(username=user, password=password)
    print(f"created MLflow user {user}")
except RestException as exc:
    if exc.error_code != "RESOURCE_ALREADY_EXISTS":
        sys.exit(f"could not create MLflow user {user}: {exc}")
    client.update_user_password(username=user, password=password)
    print(f"MLflow user {user} exists; password set from the environment")
