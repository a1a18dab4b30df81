"""Android entry point (buildozer.spec looks for main.py): the keyboard app, as `python -m device_app`.

python-for-android sets $ANDROID_PRIVATE to the app's private storage; the device data dir goes
there unless $FK_DEVICE_DIR says otherwise (the home directory of an Android app is not writable).
"""
import os

from device_app.__main__ import main

if os.environ.get("ANDROID_PRIVATE"):
    os.environ.setdefault("FK_DEVICE_DIR", os.path.join(os.environ["ANDROID_PRIVATE"], "fk-device"))

raise SystemExit(main([]))
