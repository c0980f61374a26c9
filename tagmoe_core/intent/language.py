"""A cheap guess at whether an instruction is English, for the rule tagger (which reads English only).

No language model and no dependency: the share of letters outside the Latin script (Chinese,
Japanese, Korean, Cyrillic, ...), and, for Latin-script text, a count of English function words and
edit verbs against those of the other big Latin-script languages (German, French, Spanish, Italian,
Portuguese, Dutch). Terse text with neither ("hair -> pink") counts as English.
"""

from __future__ import annotations

import re
import unicodedata

ENGLISH = frozenset("""
a an the this that these those it its them they he she him her his their my your to of in on at by for from with
into onto over under next behind and or but not no do don't is are be make makes change add remove replace turn
put place give let keep show set paint draw erase delete swap convert transform recolor recolour get rid take
away more less
background bg sky photo image picture scene style color colour look like same all everything whole
""".split())
# Function words and edit verbs of other Latin-script languages that English instructions do not use.
OTHER = frozenset("""
der die das den dem des ein eine einen einem und mit zu zum zur von vom auf ist nicht im bitte
entferne entfernen ändere ändern füge hinzu mach mache lass zeige ersetze ersetzen verwandle hintergrund farbe
le la les du une et avec dans sur pour est pas au aux supprime supprimer remplace remplacer ajoute ajouter
fais mets enlève enlever transforme garde arrière fond couleur voiture
el los las del un una y con en por es que al haz quita añade agrega convierte dibuja pon elimina borra
reemplaza cambia fondo coche estilo imagen
il lo gli della delle dello uno di è rimuovi aggiungi trasforma fai sostituisci sfondo colore
os da do dos um uma com para em mude remova adicione troque faça coloque fundo cor
het een en van op voeg verwijder maak achtergrond kleur
""".split()) - ENGLISH
WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)?")


def looks_english(text: str) -> bool:
    letters = [c for c in str(text) if c.isalpha()]
    if not letters:
        return True
    non_latin = sum(not unicodedata.name(c, "").startswith("LATIN") for c in letters)
    if non_latin / len(letters) > 0.2:
        return False
    words = WORD.findall(str(text).lower())
    english = sum(w in ENGLISH for w in words)
    other = sum(w in OTHER for w in words)
    accented = any(ord(c) > 127 for c in letters)
    return other <= english and not (accented and english == 0)
