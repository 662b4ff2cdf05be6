"""The Kaggle layout every source is read as: `styles.csv` with these columns beside `images/<id>.jpg`."""

COLUMNS = [
    "id", "gender", "masterCategory", "subCategory", "articleType",
    "baseColour", "season", "year", "usage", "productDisplayName",
]
