"""Shared core of the federated keyboard: text, vocabulary, model, metrics, wire format, data.

Imports none of tff_sim/, server/ or device_app/. Modules that need TensorFlow
(keras_model, central) import it themselves; everything else is numpy-only so the
server can use it without TensorFlow.
"""
