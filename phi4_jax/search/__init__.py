"""Pivotal Token Search: the pure search over a scorer (`pivotal_tokens`), Monte-Carlo success
estimates (`estimates`), verifiers and their sandbox, the model's rollouts (`model_scorer`),
the records written (`records`) and the job that runs it all (`job`)."""
