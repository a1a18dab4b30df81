"""The device side of the federated keyboard: a headless client that learns locally and
federates (device_app.client.DeviceClient), a fleet simulator, and a Kivy keyboard app
(device_app.ui). See device_app/README.md; run `python -m device_app --help`."""
