"""The Kivy face of the device client. Kivy is imported only inside this package, so the
headless client, the fleet and the tests of the core never import it.

Entry points (device_app/ui/app.py): run(client) opens the portrait keyboard window;
screenshot(client, path, text=...) renders it once (offscreen works) and saves a PNG.
"""
