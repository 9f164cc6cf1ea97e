"""Evaluation (SPEC 4): mteb tasks and benchmarks, local BEIR/STS/pair-classification sets, and
reranking of a first stage's top-k (the embedding model's, or a fixed one), all scored by mteb itself.

The modules, from the bottom up:
  prompts       TaskPrompts: task name -> instruction (conf/task_prompts.json + user overrides)
  fingerprints  what identifies a model, a data file or a list of texts (names, content hashes)
  cache         EmbeddingCache: .npy files keyed by (model fingerprint, dim, instruction, max length, texts)
  encoders      MtebEmbedder / MtebReranker around `tasks.models.Embedder` / `Reranker`, and model loading
  local_tasks   beir_task / sts_task / pair_classification_task: offline mteb tasks from files
  benchmarks    several mteb benchmarks in one run (shared tasks run once); Mean(Task), Mean(Type)
  first_stage   a saved top-k per query (eval.save_first_stage) that every reranker reranks (eval.first_stage)
  run           resolve_tasks, run_task, retrieve_and_rerank, score_run and the entry points evaluate_model,
                evaluation_record

Retrieval queries get the task instruction and documents none; symmetric tasks (STS, pair
classification, classification, clustering) get it on both sides (SPEC 1). mteb tells the encoder
which side it is encoding through `prompt_type` (query / document / None for symmetric tasks).
MLflow logging of the results lives in `tasks.tracking` (`log_eval_results`).
"""
