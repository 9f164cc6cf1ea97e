#!/bin/sh
# One-shot MinIO setup, run by the `minio-init` service of infra/docker-compose.yml (image minio/mc).
# Creates the buckets `mlflow` (MLflow artifacts) and `dvc` (DVC remote) and one user per bucket
# with access to that bucket only. Idempotent: every `docker compose up` may run it again.
set -eu

# Root credentials through the environment (MC_HOST_<alias>), not on a command line.
export MC_HOST_local="http://${MINIO_ROOT_USER}:${MINIO_ROOT_PASSWORD}@minio:9000"

mc mb --ignore-existing local/mlflow local/dvc

mc admin policy create local mlflow-artifacts /init/policy-mlflow.json
mc admin policy create local dvc-remote /init/policy-dvc.json

mc admin user add local "$MLFLOW_S3_ACCESS_KEY" "$MLFLOW_S3_SECRET_KEY"
mc admin user add local "$DVC_S3_ACCESS_KEY" "$DVC_S3_SECRET_KEY"

attach() {  # policy user: attach, accepting "already attached" on later runs
    if ! out=$(mc admin policy attach local "$1" --user "$2" 2>&1); then
        case "$out" in
            *already*) ;;
            *) echo "$out" >&2; exit 1 ;;
        esac
    fi
}
attach mlflow-artifacts "$MLFLOW_S3_ACCESS_KEY"
attach dvc-remote "$DVC_S3_ACCESS_KEY"

echo "minio-init: buckets mlflow, dvc and their users are ready"
