//! `Sp<T>`: a value from the recipe together with where it was written.

use std::ops::{Deref, Range};

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use toml::Spanned;

/// A recipe value and its byte span in the recipe file. A value filled in
/// from a default has an empty span at 0: nothing to point at, and nothing
/// to complain about either, since defaults are valid by construction.
#[derive(Clone, Debug)]
pub struct Sp<T> {
    pub value: T,
    pub span: Range<usize>,
}

impl<T> Sp<T> {
    /// A value the user did not write (a default).
    pub fn implicit(value: T) -> Self {
        Sp { value, span: 0..0 }
    }

    pub fn new(value: T, span: Range<usize>) -> Self {
        Sp { value, span }
    }

    /// Whether the user wrote this value (as opposed to a default).
    pub fn is_written(&self) -> bool {
        !self.span.is_empty()
    }
}

impl<T> Deref for Sp<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.value
    }
}

impl<T: PartialEq> PartialEq for Sp<T> {
    fn eq(&self, other: &Self) -> bool {
        self.value == other.value
    }
}

impl<T: Default> Default for Sp<T> {
    fn default() -> Self {
        Sp::implicit(T::default())
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Sp<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let spanned = Spanned::<T>::deserialize(deserializer)?;
        let span = spanned.span();
        Ok(Sp {
            value: spanned.into_inner(),
            span,
        })
    }
}

// Serialized as the bare value: spans never enter a cache key.
impl<T: Serialize> Serialize for Sp<T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.value.serialize(serializer)
    }
}

impl<T: schemars::JsonSchema> schemars::JsonSchema for Sp<T> {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        T::schema_name()
    }
    fn schema_id() -> std::borrow::Cow<'static, str> {
        T::schema_id()
    }
    fn json_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        T::json_schema(generator)
    }
    fn inline_schema() -> bool {
        T::inline_schema()
    }
}
