import mlflow

from tasks.tracking import RerankerPyfunc

mlflow.models.set_model(RerankerPyfunc())
