"""Observing training: the callbacks the loop calls (callbacks), CodeCarbon per stage and
the emissions reports (emissions), MLflow / Weights & Biases (tracking), and the HTTP
monitoring API over the runs (monitor_api)."""
