"""The model folder and everything that reads or writes weights.

    folders.py    the model folder's manifest and config, checked (no torch); what the commands may write
    loading.py    the networks of a model folder, read once, checked, on the device
    prefetch.py   the network files mapped and hashed from a command's first second
    originals.py  the original thu-ml / OpenAI files read into the networks' state dicts
    convert.py    the converted folder written whole, then swapped in
    random_weights.py  random weights in the original layouts (tests, benchmarks)
"""
