"""Does the text help, and when? ``python -m gpt4image.experiment`` (main.py): both recipes on generated
data with noisy labels, against controls. data.py draws the images, their descriptions and the bag-of-words
tables; runs.py trains the runs on several processes; table.py summarises them.
"""
