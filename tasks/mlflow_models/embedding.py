import mlflow

from tasks.tracking import EmbeddingPyfunc

mlflow.models.set_model(EmbeddingPyfunc())
