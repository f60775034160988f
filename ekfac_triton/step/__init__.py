"""The optimizer step: its tensor maths written once (:mod:`.maths`), the phases that order it
(:mod:`.engine`), and how it runs, eagerly or compiled (:mod:`.execution`)."""
