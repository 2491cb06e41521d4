"""The goal-driven compression search (Optuna): the space from the model and plan, trials as nested
MLflow runs, a study shared by many workers, and the choice of the plan the pipeline fine-tunes."""
