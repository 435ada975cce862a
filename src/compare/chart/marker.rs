//! Drawing one marker shape, in data coordinates or in pixels (legend).

use plotters::coord::CoordTranslate;
use plotters::prelude::*;

use super::style::{MarkerShape, MARKER_SIZE};

/// Draws `shape` centred on `at` on any drawing area (chart panel or legend strip),
/// over a white halo so it stands out from lines and from a marker beneath it.
pub fn draw_marker<CT>(
    area: &DrawingArea<SVGBackend<'_>, CT>,
    at: CT::From,
    shape: MarkerShape,
    colour: RGBColor,
) -> anyhow::Result<()>
where
    CT: CoordTranslate,
    CT::From: Clone + 'static,
{
    draw_shape(area, at.clone(), shape, WHITE, MARKER_SIZE + 2)?;
    draw_shape(area, at, shape, colour, MARKER_SIZE)
}

fn draw_shape<CT>(
    area: &DrawingArea<SVGBackend<'_>, CT>,
    at: CT::From,
    shape: MarkerShape,
    colour: RGBColor,
    size: i32,
) -> anyhow::Result<()>
where
    CT: CoordTranslate,
    CT::From: Clone + 'static,
{
    match shape {
        MarkerShape::Circle => area.draw(&Circle::new(at, size, colour.filled()))?,
        MarkerShape::Triangle => area.draw(&TriangleMarker::new(at, size + 1, colour.filled()))?,
        MarkerShape::Square => {
            let half = size - 1;
            area.draw(
                &(EmptyElement::at(at)
                    + Rectangle::new([(-half, -half), (half, half)], colour.filled())),
            )?
        }
        MarkerShape::Cross => area.draw(&Cross::new(at, size, colour.stroke_width(3)))?,
    }
    Ok(())
}
