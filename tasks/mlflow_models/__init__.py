"""MLflow "models from code" definitions: the pyfunc classes are instantiated by these files when a
logged model is loaded, so no pickled Python object is ever deserialised."""
