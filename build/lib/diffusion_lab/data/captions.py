"""Captions for text-to-image training: a caption column, or a template filled from class labels."""

from collections.abc import Sequence

# Oxford 102 flowers (Nilsback & Zisserman 2008), by class number 1..102. nelorth/oxford-flowers stores the
# class numbers as ClassLabel names '1'..'102' (in string order), so a label's name indexes this list.
OXFORD_FLOWERS_102 = (
    "pink primrose", "hard-leaved pocket orchid", "canterbury bells", "sweet pea", "english marigold",
    "tiger lily", "moon orchid", "bird of paradise", "monkshood", "globe thistle", "snapdragon", "colt's foot",
    "king protea", "spear thistle", "yellow iris", "globe-flower", "purple coneflower", "peruvian lily",
    "balloon flower", "giant white arum lily", "fire lily", "pincushion flower", "fritillary", "red ginger",
    "grape hyacinth", "corn poppy", "prince of wales feathers", "stemless gentian", "artichoke",
    "sweet william", "carnation", "garden phlox", "love in the mist", "mexican aster", "alpine sea holly",
    "ruby-lipped cattleya", "cape flower", "great masterwort", "siam tulip", "lenten rose", "barbeton daisy",
    "daffodil", "sword lily", "poinsettia", "bolero deep blue", "wallflower", "marigold", "buttercup",
    "oxeye daisy", "common dandelion", "petunia", "wild pansy", "primula", "sunflower", "pelargonium",
    "bishop of llandaff", "gaura", "geranium", "orange dahlia", "pink-yellow dahlia", "cautleya spicata",
    "japanese anemone", "black-eyed susan", "silverbush", "californian poppy", "osteospermum", "spring crocus",
    "bearded iris", "windflower", "tree poppy", "gazania", "azalea", "water lily", "rose", "thorn apple",
    "morning glory", "passion flower", "lotus", "toad lily", "anthurium", "frangipani", "clematis", "hibiscus",
    "columbine", "desert-rose", "tree mallow", "magnolia", "cyclamen", "watercress", "canna lily",
    "hippeastrum", "bee balm", "ball moss", "foxglove", "bougainvillea", "camellia", "mallow",
    "mexican petunia", "bromelia", "blanket flower", "trumpet creeper", "blackberry lily",
)  # fmt: skip

# Display names for label names, by the key a data config gives as `label_names`.
LABEL_NAME_TABLES = {
    "oxford_flowers_102": {str(number): name for number, name in enumerate(OXFORD_FLOWERS_102, start=1)},
}


class CaptionMaker:
    """Turns a row into its caption: the caption column if there is one, else the template with {label}.

    `label_names` are the dataset's own names for label ids (ClassLabel names, folder names); `display`
    maps those names to words for the caption (e.g. '77' -> 'passion flower').
    """

    def __init__(
        self,
        caption_column: str | None,
        template: str | None,
        label_column: str | None,
        label_names: Sequence[str] | None,
        display: str | dict | None = None,
    ) -> None:
        if caption_column is None and template is not None and label_column is None:
            raise ValueError("data.caption_template needs data.label_column to fill {label}")
        self.caption_column, self.template, self.label_column = caption_column, template, label_column
        self.label_names = list(label_names) if label_names is not None else None
        self.display = LABEL_NAME_TABLES[display] if isinstance(display, str) else dict(display or {})

    @property
    def enabled(self) -> bool:
        return self.caption_column is not None or self.template is not None

    def label_word(self, label) -> str:
        name = (
            self.label_names[label] if self.label_names is not None and isinstance(label, int) else str(label)
        )
        return self.display.get(name, name)

    def __call__(self, row: dict) -> str | None:
        if self.caption_column is not None:
            caption = row.get(self.caption_column)
            return caption.strip() if isinstance(caption, str) and caption.strip() else None
        return self.template.format(label=self.label_word(row[self.label_column]))
