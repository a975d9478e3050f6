"""Offline generators run by hand: the model card's pictures (`pixelcnn card`) and the web demo's example
images (`python -m app.tools.demo_examples`)."""
